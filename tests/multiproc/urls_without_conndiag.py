from __future__ import annotations

from django.urls import path

from tests.multiproc import views

urlpatterns = [
    path("pid/", views.pid, name="pid"),
    path("echo/", views.echo, name="echo"),
]
