"""install() is idempotent and wires signals, connections and thread tracking."""

from __future__ import annotations

from django.core.signals import request_started
from django.db import connections

from conndiag.install import install
from conndiag.wrapper import EXECUTE_WRAPPER


def test_install_twice_changes_nothing():
    """Calling install() again neither duplicates the wrapper nor the receivers."""
    before = len(request_started.receivers)
    install()
    install()
    assert len(request_started.receivers) == before
    for alias in connections:
        assert connections[alias].execute_wrappers.count(EXECUTE_WRAPPER) == 1


def test_import_has_no_side_effects():
    """Importing conndiag reads no settings and creates no metrics (lazy attributes)."""
    import subprocess
    import sys

    code = (
        "import sys, conndiag; "
        "assert 'django.db' not in sys.modules, 'django.db imported'; "
        "assert 'prometheus_client' not in sys.modules, 'metrics imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
