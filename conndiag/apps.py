"""App config: all of conndiag's wiring happens in ``ready()``, none at import."""

from __future__ import annotations

from django.apps import AppConfig


class ConnDiagConfig(AppConfig):
    name = "conndiag"
    verbose_name = "conndiag"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
        from .install import install

        install()
