from django.urls import include, path
from jobs import views

urlpatterns = [
    path("", views.index, name="index"),
    path("jobs/", views.job_list, name="job-list"),
    path("ops/<slug:action>", views.OpsView.as_view(), name="ops"),
    path("async/jobs", views.async_jobs, name="async-jobs"),
    # conndiag's /metrics (loopback-only unless CONNDIAG says otherwise)
    path("", include("conndiag.urls")),
]
