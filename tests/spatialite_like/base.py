"""A database backend built the way SpatiaLite's is (``django.contrib.gis.db.backends.
spatialite``): a subclass of SQLite's ``DatabaseWrapper``, vendor ``sqlite``, an ENGINE path
without ``sqlite3`` in it. The real SpatiaLite backend needs GDAL, which CI does not have."""

from __future__ import annotations

from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper


class DatabaseWrapper(SQLiteDatabaseWrapper):
    pass
