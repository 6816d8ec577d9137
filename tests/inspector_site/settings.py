"""``tests.multiproc`` (MariaDB, persistent connections) with the forked policy relaxed.

``POLICY["forked"] = "ignore"`` lets a child use a connection it inherited across fork:
the one way the shared-connection test can make two processes really use one server
connection (conndiag's default refuses or replaces it). The inspector's directory is the one
inside ``PROMETHEUS_MULTIPROC_DIR``, which the test sets for the server and the command.
"""

from __future__ import annotations

from tests.multiproc.settings import *  # noqa: F403

CONNDIAG = {"POLICY": {"forked": "ignore"}}
ROOT_URLCONF = "tests.inspector_site.urls"
