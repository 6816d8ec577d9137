"""The connection inspector page: access rules, its HTML, and a real browser rendering it."""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import AnonymousUser, User
from django.test import Client, RequestFactory, override_settings

from conndiag import pages
from tests.conftest import require_tool
from tests.handlers import threaded_wsgi_server
from tests.test_inspector import raw_mysql

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "mysql", "postgres"])

URL = "/conndiag/connections"


@pytest.fixture
def inspector_dir(tmp_path: Path) -> Iterator[Path]:
    with override_settings(CONNDIAG={"INSPECTOR_DIR": str(tmp_path)}):
        yield tmp_path


def test_loopback_gets_the_page_with_every_connection(inspector_dir: Path) -> None:
    """From loopback (the default rule of /metrics) the page lists the connections, flags the
    orphan, and refreshes itself."""
    orphan = raw_mysql()
    try:
        response = Client().get(URL + "?refresh=7")
        assert response.status_code == 200
        html = response.content.decode()
        assert response["Cache-Control"] == "no-store"
        assert '<meta http-equiv="refresh" content="7">' in html
        assert f'data-server-id="{orphan.thread_id()}" data-flags="orphan"' in html
        assert "(no live process)" in html
        assert "<script" not in html
    finally:
        orphan.close()


def test_refresh_is_bounded_and_can_be_stopped(inspector_dir: Path) -> None:
    """?refresh=0 stops the refresh; junk falls back to the default; huge values are capped."""
    assert "http-equiv" not in Client().get(URL + "?refresh=0").content.decode()
    assert 'content="5"' in Client().get(URL + "?refresh=x").content.decode()
    assert 'content="3600"' in Client().get(URL + "?refresh=99999").content.decode()


def test_other_clients_are_refused_like_metrics(inspector_dir: Path) -> None:
    """A non-loopback client without a token or allowed network gets 403; POST gets 405."""
    assert Client(REMOTE_ADDR="203.0.113.9").get(URL).status_code == 403
    assert Client().post(URL).status_code == 405


def test_a_token_is_enough(tmp_path: Path) -> None:
    """With METRICS_TOKEN, a remote client with the bearer token is served, others get 401."""
    conf = {"INSPECTOR_DIR": str(tmp_path), "METRICS_TOKEN": "s3cret"}
    with override_settings(CONNDIAG=conf):
        client = Client(REMOTE_ADDR="203.0.113.9")
        assert client.get(URL).status_code == 401
        assert client.get(URL, HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


@pytest.mark.parametrize(
    ("user", "address", "status"),
    [
        (None, "10.1.2.3", 200),  # anonymous, from an allowed network
        ("staff", "10.1.2.3", 200),
        ("plain", "10.1.2.3", 403),  # logged in, not staff, not on loopback
        ("plain", "127.0.0.1", 200),  # loopback: as /metrics
        (None, "192.0.2.1", 403),  # not an allowed network
    ],
)
def test_logged_in_users_off_loopback_must_be_staff(
    tmp_path: Path, user: str | None, address: str, status: int
) -> None:
    """METRICS_ALLOWED_IPS as for /metrics, plus is_staff for a logged-in non-loopback user."""
    conf = {"INSPECTOR_DIR": str(tmp_path), "METRICS_ALLOWED_IPS": ["10.0.0.0/8", "127.0.0.1"]}
    with override_settings(CONNDIAG=conf):
        request = RequestFactory().get(URL, REMOTE_ADDR=address)
        if user is None:
            request.user = AnonymousUser()
        else:
            request.user = User.objects.create(username=user, is_staff=user == "staff")
        assert pages.connections(request).status_code == status


def test_off_answers_404(tmp_path: Path) -> None:
    """CONNDIAG['INSPECTOR'] = False: no page."""
    with override_settings(CONNDIAG={"INSPECTOR": False, "INSPECTOR_DIR": str(tmp_path)}):
        assert Client().get(URL).status_code == 404


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's chromium headless with a fresh profile."""
    binary = require_tool("chromium", "chromium")
    with tempfile.TemporaryDirectory(prefix="conndiag-chromium-") as profile:
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def wsgi_server() -> Iterator[str]:
    """A real threaded HTTP server serving the test site."""
    with threaded_wsgi_server() as url:
        yield url


def test_a_real_browser_renders_the_page(
    inspector_dir: Path, wsgi_server: str, tmp_path: Path
) -> None:
    """Chromium loads the page from a live server: the DOM it built has the orphan row
    highlighted with its flag, the bars (meter elements) and the refresh; its screenshot is
    a real image of the requested size."""
    orphan = raw_mysql()
    try:
        url = f"{wsgi_server}{URL}"
        dom = chromium("--dump-dom", url).stdout
        assert f'data-server-id="{orphan.thread_id()}"' in dom
        row = dom[dom.index(f'data-server-id="{orphan.thread_id()}"') :]
        row = row[: row.index("</tr>")]
        assert 'data-flags="orphan"' in row
        assert '<span class="flag orphan">orphan</span>' in row
        assert (
            'class="flagged'
            in dom[dom.rindex("<tr", 0, dom.index(f'data-server-id="{orphan.thread_id()}"')) :][:80]
        )
        assert "<meter" in dom
        assert 'http-equiv="refresh"' in dom
        shot = tmp_path / "page.png"
        chromium(f"--screenshot={shot}", "--window-size=1400,700", "--hide-scrollbars", url)
        assert png_size(shot) == (1400, 700)
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank image
        target = os.environ.get("CONNDIAG_SCREENSHOT")
        if target:  # regenerate docs/ images on purpose only
            Path(target).write_bytes(shot.read_bytes())
    finally:
        orphan.close()
