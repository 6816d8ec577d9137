"""A site for the inspector's server tests: tests.multiproc plus a fork-happy view."""
