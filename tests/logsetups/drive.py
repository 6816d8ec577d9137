"""Drive a fresh project (``tests.logsetups.settings``) through real WSGI and ASGI handling.

    CONNDIAG_LOG_SETUP=nothing python -m tests.logsetups.drive

Each handler serves ``/sync/`` (routine queries on the request thread) and ``/thread/`` (a
view whose thread writes through the ORM: refused as detached, one anomaly). The script
prints nothing itself: whatever reaches stdout and stderr is the logging set-up's.
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.logsetups.settings")


def main() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)

    from tests.handlers import asgi_get, wsgi_get

    for path in ("/sync/", "/thread/"):
        status, body = wsgi_get(path)
        if not status.startswith("200"):
            raise SystemExit(f"WSGI {path}: {status} {body[:500]!r}")
        code, body = asyncio.run(asgi_get(path))
        if code != 200:
            raise SystemExit(f"ASGI {path}: {code} {body[:500]!r}")


if __name__ == "__main__":
    main()
