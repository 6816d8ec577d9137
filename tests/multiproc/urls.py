from __future__ import annotations

from django.urls import include, path

from tests.multiproc import views

urlpatterns = [
    path("item-count/", views.item_count, name="item-count"),
    path("pid/", views.pid, name="pid"),
    path("sleep/", views.sleep, name="sleep"),
    path("echo/", views.echo, name="echo"),
    path("", include("conndiag.urls")),
]
