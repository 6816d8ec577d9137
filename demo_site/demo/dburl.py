"""``DATABASE_URL`` parsing, shared by the settings and the runner (no dependency needed)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


class DatabaseURLError(ValueError):
    pass


def database_from_url(url: str) -> dict[str, object]:
    """A ``DATABASES`` entry from ``mysql://user:pass@host:port/name`` or ``sqlite:///path``."""
    parts = urlsplit(url)
    if parts.scheme in ("mysql", "mariadb"):
        return {
            "ENGINE": "django.db.backends.mysql",
            "HOST": parts.hostname or "127.0.0.1",
            "PORT": str(parts.port or 3306),
            "USER": unquote(parts.username or "root"),
            "PASSWORD": unquote(parts.password or ""),
            "NAME": parts.path.lstrip("/") or "conndiag_demo",
            "OPTIONS": {"charset": "utf8mb4"},
        }
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parts.path[1:] or ":memory:"}
    msg = (
        f"DATABASE_URL={url!r} is not supported: use mysql://user:pass@host:port/name "
        "or sqlite:///path."
    )
    raise DatabaseURLError(msg)


def is_mysql(url: str | None) -> bool:
    return bool(url) and urlsplit(url or "").scheme in ("mysql", "mariadb")
