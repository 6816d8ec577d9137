from __future__ import annotations

from django.urls import include, path

from tests.inspector_site import views
from tests.multiproc import views as multiproc_views

urlpatterns = [
    path("item-count/", multiproc_views.item_count, name="item-count"),
    path("spawn-helper/", views.spawn_helper, name="spawn-helper"),
    path("", include("conndiag.urls")),
]
