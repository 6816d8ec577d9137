from django.urls import include, path

from tests.testapp import views

urlpatterns = [
    path("sync/", views.sync_view, name="sync"),
    path("thread/", views.thread_view, name="thread"),
    path("executor/", views.executor_view, name="executor"),
    path("hatch/", views.hatch_view, name="hatch"),
    path("async/", views.async_view, name="async"),
    path("async-to-thread/", views.async_to_thread_view, name="async-to-thread"),
    path("sync-awaits-to-thread/", views.sync_awaits_to_thread_view, name="sync-awaits-to-thread"),
    path("gate/", views.gate_view, name="gate"),
    path("async-hatch/", views.async_hatch_view, name="async-hatch"),
    path("nothing/", views.nothing_view, name="nothing"),
    path("scope/<str:part>/", views.scope_view, name="scope"),
    path("bench/", views.bench_view, name="bench"),
    path("", include("conndiag.urls")),
]
