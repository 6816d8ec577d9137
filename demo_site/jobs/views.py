"""The original report's views, the safe way and the broken ways.

* ``/ops/trigger-job`` runs the job synchronously in the view: the safe pattern.
* ``/ops/trigger-job-in-thread`` does what the original report did: starts a
  ``threading.Thread`` that writes through the ORM and answers "success" at once. With
  conndiag's default policy the thread's first query raises ``DetachedQueryError``; the
  thread logs it, and the demo log shows it.
* ``/ops/trigger-job-in-pool`` is the same mistake through a ``ThreadPoolExecutor``.
* ``/ops/trigger-job-background`` starts the thread too, but runs the job inside
  ``conndiag.background_db_work()``, the escape hatch that manages the connection.
* ``/ops/export-report`` leaks a connection: it opens a dedicated one for a "long export"
  and keeps it in a module-level cache, outside ``django.db.connections``, so Django never
  closes it. The connection inspector (``manage.py conndiag connections``,
  ``/conndiag/connections``) lists it, flagged ``past_max_age``.
* ``/async/jobs`` uses the async ORM: observed under ASGI and WSGI, no false alarm.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

import conndiag
from jobs.models import JobRecord

log = structlog.get_logger("jobs")

#: the pool the "in-pool" endpoint submits to (threads start lazily, in each worker process)
POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jobs-pool")

SUCCESS = "Task run success"

#: the "export" endpoint's dedicated connections: cached, never closed (the leak)
REPORT_CONNECTIONS: list[Any] = []
#: leaked connections per process, at most (the demo must not exhaust the server)
MAX_REPORT_CONNECTIONS = 3


def _params(request: HttpRequest) -> dict[str, Any]:
    params: dict[str, Any] = {k: v for k, v in request.GET.items()}
    if request.method == "POST" and request.body:
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        if isinstance(body, dict):
            params.update(body)
        else:
            params.update(request.POST.dict())
    return params


def _username(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    return getattr(user, "username", "") or request.headers.get("X-User", "ops")


def _run_job(
    params: dict[str, Any], username: str, runner: str, origin_request_id: str | None
) -> None:
    """The body of the threads the broken endpoints start: log the outcome, never crash."""
    try:
        job = JobRecord.perform(params, username=username, runner=runner)
    except conndiag.DetachedQueryError as exc:
        # The work is lost, after the response already said "success". conndiag refused
        # the first query and said why in the exception (and in conndiag.query.refused).
        log.error(
            "jobs.job.lost",
            runner=runner,
            origin_request_id=origin_request_id,
            error=type(exc).__name__,
            context=exc.context,
            request_path=exc.request_path,
        )
    except Exception as exc:
        log.exception(
            "jobs.job.failed",
            runner=runner,
            origin_request_id=origin_request_id,
            error=type(exc).__name__,
        )
    else:
        log.info("jobs.job.done", runner=runner, job_id=job.pk, origin_request_id=origin_request_id)


def _run_job_background(
    params: dict[str, Any], username: str, origin_request_id: str | None
) -> None:
    """The same job, done right: inside the escape hatch, which manages the connection."""
    with conndiag.background_db_work():
        _run_job(params, username, "background", origin_request_id)


@method_decorator(csrf_exempt, name="dispatch")
class OpsView(View):
    """Operations endpoints: ``/ops/<action>``, POST (or GET, for convenience)."""

    actions = {
        "trigger-job": "trigger_job",
        "trigger-job-in-thread": "trigger_job_in_thread",
        "trigger-job-in-pool": "trigger_job_in_pool",
        "trigger-job-background": "trigger_job_background",
        "export-report": "export_report",
    }

    def _handler(self, action: str) -> Any:
        name = self.actions.get(action)
        if name is None:
            raise Http404(f"no such operation: {action}")
        return getattr(self, name)

    def get(self, request: HttpRequest, action: str) -> HttpResponse:
        return self._handler(action)(request)

    def post(self, request: HttpRequest, action: str) -> HttpResponse:
        return self._handler(action)(request)

    @staticmethod
    def _request_id() -> str | None:
        return structlog.contextvars.get_contextvars().get("request_id")

    def trigger_job(self, request: HttpRequest) -> HttpResponse:
        """The safe pattern: the job runs in the view, on the request's own connection."""
        job = JobRecord.perform(_params(request), username=_username(request), runner="sync")
        log.info("jobs.job.done", runner="sync", job_id=job.pk)
        return HttpResponse(SUCCESS)

    def trigger_job_in_thread(self, request: HttpRequest) -> HttpResponse:
        """The original report's bug: ORM work in a thread the view started."""
        thread = threading.Thread(
            target=_run_job,
            name="jobs-thread",
            args=(_params(request), _username(request), "thread", self._request_id()),
        )
        thread.start()
        return HttpResponse(SUCCESS)

    def trigger_job_in_pool(self, request: HttpRequest) -> HttpResponse:
        """The same bug through a long-lived pool thread (the one that hits wait_timeout)."""
        POOL.submit(_run_job, _params(request), _username(request), "pool", self._request_id())
        return HttpResponse(SUCCESS)

    def trigger_job_background(self, request: HttpRequest) -> HttpResponse:
        """Deliberate background work, done right with ``conndiag.background_db_work()``."""
        thread = threading.Thread(
            target=_run_job_background,
            name="jobs-background",
            args=(_params(request), _username(request), self._request_id()),
        )
        thread.start()
        return HttpResponse(SUCCESS)

    def export_report(self, request: HttpRequest) -> HttpResponse:
        """Broken: a dedicated connection per export, cached and never closed.

        ``connections.create_connection`` makes a connection Django's request cycle does not
        know (it is not in ``django.db.connections``): nothing closes it at the end of the
        request, so it stays open, idle, until the process exits.
        """
        if len(REPORT_CONNECTIONS) >= MAX_REPORT_CONNECTIONS:
            return JsonResponse({"jobs": None, "cached_connections": len(REPORT_CONNECTIONS)})
        db = connections.create_connection(DEFAULT_DB_ALIAS)
        with db.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM {JobRecord._meta.db_table}")
            (count,) = cursor.fetchone()
        REPORT_CONNECTIONS.append(db)  # "reused by the next export" - it never is
        return JsonResponse({"jobs": count, "cached_connections": len(REPORT_CONNECTIONS)})


def job_list(request: HttpRequest) -> HttpResponse:
    jobs = list(JobRecord.objects.all()[:50])
    return render(request, "jobs/list.html", {"jobs": jobs, "total": JobRecord.objects.count()})


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "jobs/index.html", {"actions": list(OpsView.actions)})


async def async_jobs(request: HttpRequest) -> HttpResponse:
    """The async ORM: every query runs on the request's thread, so it is ``request``."""
    job = await JobRecord.objects.acreate(
        name="async",
        params={"via": "async"},
        runner="async",
        status=JobRecord.Status.DONE,
        create_username="async",
        update_username="async",
    )
    fetched = await JobRecord.objects.aget(pk=job.pk)
    total = await JobRecord.objects.acount()
    return JsonResponse({"id": fetched.pk, "status": fetched.status, "total": total})
