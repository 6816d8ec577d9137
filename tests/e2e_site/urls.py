from django.urls import include, path

from tests.e2e_site import views

urlpatterns = [
    path("work/", views.work, name="work"),
    path("detached/", views.detached, name="detached"),
    path("arm/", views.arm, name="arm"),
    path("gone-away/", views.gone_away, name="gone-away"),
    path("", include("conndiag.urls")),
]
