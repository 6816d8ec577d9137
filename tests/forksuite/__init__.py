"""A small test suite run by Django's parallel runner and pytest-xdist (tests/test_fork_runners.py)."""
