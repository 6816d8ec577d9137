"""``path("", include("conndiag.urls"))`` serves the metrics at ``/metrics`` and the
connection inspector at ``/conndiag/connections``."""

from __future__ import annotations

from django.urls import path

from . import pages, views

app_name = "conndiag"

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
    path("conndiag/connections", pages.connections, name="connections"),
]
