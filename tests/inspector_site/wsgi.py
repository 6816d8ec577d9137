"""The WSGI application; with ``INSPECTOR_SITE_QUERY_AT_IMPORT=1`` it runs a query at import,
so under ``gunicorn --preload`` the master opens a connection every worker inherits."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.inspector_site.settings")

application = get_wsgi_application()

if os.environ.get("INSPECTOR_SITE_QUERY_AT_IMPORT") == "1":
    from tests.testapp.models import Item

    Item.objects.count()
