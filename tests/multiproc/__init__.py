"""A small site for the real multi-process test: gunicorn workers against MariaDB."""
