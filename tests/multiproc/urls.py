from __future__ import annotations

from django.urls import include, path

from tests.multiproc import views

urlpatterns = [
    path("item-count/", views.item_count, name="item-count"),
    path("", include("conndiag.urls")),
]
