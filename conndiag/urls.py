"""``path("", include("conndiag.urls"))`` serves the metrics at ``/metrics`` and the
connection inspector at ``/conndiag/connections``."""

from __future__ import annotations

from django.urls import include, path

from . import pages, views

app_name = "conndiag"

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
    # the connection inspector
    path("conndiag/", include([path("connections", pages.connections, name="connections")])),
]
