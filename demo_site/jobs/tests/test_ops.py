"""The demo's endpoints under conndiag's pytest plugin.

Each test calls its endpoint through Django's test client and checks what the client sees:
"Task run success". For the broken endpoints that is all a test without conndiag could
check, and it would pass; in production their work is lost. conndiag's plugin fails them
with the refusal's message, so they are marked as expected failures (strict: if they
passed, the suite would fail). The safe endpoints pass.
"""

from __future__ import annotations

import django
import pytest
from django.test import Client

from jobs.models import JobRecord
from jobs.views import SUCCESS

BROKEN = pytest.mark.xfail(
    reason="conndiag refuses the ORM work this endpoint hands to another thread", strict=True
)


def _post(path: str) -> None:
    response = Client().post(path, {"name": "nightly"})
    assert response.status_code == 200
    assert response.content.decode() == SUCCESS


@pytest.mark.django_db
def test_trigger_job_runs_the_job_in_the_view():
    """The safe pattern: the job is recorded synchronously, on the request's connection."""
    _post("/ops/trigger-job")
    job = JobRecord.objects.get()
    assert (job.runner, job.status) == ("sync", JobRecord.Status.DONE)


@BROKEN
@pytest.mark.django_db(transaction=True)
def test_trigger_job_in_thread():
    """The original report's bug: the response says success, the thread's work is refused."""
    _post("/ops/trigger-job-in-thread")


@BROKEN
@pytest.mark.django_db(transaction=True)
def test_trigger_job_in_pool():
    """The same bug through a ThreadPoolExecutor."""
    _post("/ops/trigger-job-in-pool")


@pytest.mark.django_db(transaction=True)
def test_trigger_job_background_uses_the_escape_hatch(conndiag_events):
    """A thread doing its work inside background_db_work(): allowed, and the job is done."""
    _post("/ops/trigger-job-background")
    conndiag_events.settle()
    job = JobRecord.objects.get()
    assert (job.runner, job.status) == ("background", JobRecord.Status.DONE)
    assert conndiag_events.queries
    assert not conndiag_events.refused


@pytest.mark.django_db(transaction=True)
@pytest.mark.conndiag_allow("detached")
def test_the_thread_s_refusal_is_in_conndiag_events(conndiag_events):
    """With the marker the test may assert on the refusal itself: what conndiag said, where."""
    _post("/ops/trigger-job-in-thread")
    refused = conndiag_events.settle().refused
    assert [(e.context, e.thread_name) for e in refused] == [("detached", "jobs-thread")]
    assert "POST /ops/trigger-job-in-thread" in refused[0].message
    assert "Fix:" in refused[0].message
    assert not JobRecord.objects.exists()


@pytest.mark.skipif(django.VERSION < (4, 1), reason="the async ORM is Django 4.1+")
@pytest.mark.django_db(transaction=True)
def test_async_orm_view():
    """The async ORM runs on the request's thread: nothing to refuse."""
    response = Client().get("/async/jobs")
    assert response.status_code == 200
    assert response.json()["total"] == 1
