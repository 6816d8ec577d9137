"""Drive requests through Django's real WSGI and ASGI handlers (not the test Client).

The test Client disconnects ``close_old_connections`` around its request signals; these
helpers keep Django's real connection recycling, as a production server would.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.util import setup_testing_defaults

from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler


def wsgi_get(
    path: str, query: str = "", headers: dict[str, str] | None = None
) -> tuple[str, bytes]:
    """One GET through ``WSGIHandler`` on this thread, closed like a server closes it."""
    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    response = WSGIHandler()(environ, start_response)
    try:
        body = b"".join(response)
    finally:
        response.close()  # fires request_finished, as a WSGI server does
    return status[0], body


def wsgi_json(path: str, query: str = "") -> Any:
    status, body = wsgi_get(path, query)
    assert status.startswith("200"), (status, body[:2000])
    return json.loads(body)


async def asgi_get(path: str, query: str = "") -> tuple[int, bytes]:
    """One GET through ``ASGIHandler``, as an ASGI server would send it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    app = ApplicationCommunicator(ASGIHandler(), scope)
    await app.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await app.receive_output(10)
    body = b""
    while True:
        message = await app.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await app.wait(10)
    return start["status"], body


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def threaded_wsgi_server() -> Iterator[str]:
    """A real threaded WSGI server (one thread per request) on a free loopback port."""
    server = make_server(
        "127.0.0.1", 0, WSGIHandler(), server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="test-wsgi-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())
