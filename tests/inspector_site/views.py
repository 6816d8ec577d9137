from __future__ import annotations

import os
import time

from django.http import HttpRequest, HttpResponse, JsonResponse


def spawn_helper(request: HttpRequest) -> HttpResponse:
    """Fork a helper process that sleeps (as a ``multiprocessing`` fork child would): it
    inherits the worker's open sockets, database connections included, and never uses them."""
    pid = os.fork()
    if pid == 0:  # the helper
        try:
            time.sleep(float(request.GET.get("seconds", "60")))
        finally:
            os._exit(0)
    return JsonResponse({"helper": pid, "worker": os.getpid()})
