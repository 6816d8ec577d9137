"""conndiag: make the life of Django database connections visible, and make the unsafe
patterns fail loudly.

Importing this package reads no settings and creates no metrics: wiring happens in
``conndiag.apps.ConnDiagConfig.ready()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "BackgroundQueryError",
    "ConnDiagError",
    "CrossThreadQueryError",
    "DetachedQueryError",
    "ForkedConnectionError",
    "RequestQueryError",
    "UnsafeQueryError",
    "background_db_work",
]

if TYPE_CHECKING:
    from .background import background_db_work
    from .exceptions import (
        BackgroundQueryError,
        ConnDiagError,
        CrossThreadQueryError,
        DetachedQueryError,
        ForkedConnectionError,
        RequestQueryError,
        UnsafeQueryError,
    )


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import conndiag`` does not import django.db before settings exist.
    if name == "background_db_work":
        from .background import background_db_work

        return background_db_work
    if name in __all__:
        from . import exceptions

        return getattr(exceptions, name)
    msg = f"module 'conndiag' has no attribute {name!r}"
    raise AttributeError(msg)
