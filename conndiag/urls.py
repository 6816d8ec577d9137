"""``path("", include("conndiag.urls"))`` serves the metrics at ``/metrics``."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "conndiag"

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
