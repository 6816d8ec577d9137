"""conndiag's exceptions: one base class, one subclass per context, facts as attributes."""

from __future__ import annotations

import conndiag
from conndiag.conf import CONTEXTS
from conndiag.exceptions import ERRORS_BY_CONTEXT, ConnDiagError, UnsafeQueryError


def test_every_context_has_its_error_under_the_common_base():
    """Each context maps to a distinct UnsafeQueryError subclass, all ConnDiagErrors."""
    assert set(ERRORS_BY_CONTEXT) == set(CONTEXTS)
    assert len(set(ERRORS_BY_CONTEXT.values())) == len(CONTEXTS)
    for cls in ERRORS_BY_CONTEXT.values():
        assert issubclass(cls, UnsafeQueryError)
        assert issubclass(cls, ConnDiagError)


def test_errors_are_exported_from_the_package():
    """The public names resolve lazily from ``conndiag`` itself."""
    assert conndiag.DetachedQueryError is ERRORS_BY_CONTEXT["detached"]
    assert conndiag.ForkedConnectionError is ERRORS_BY_CONTEXT["forked"]
    assert conndiag.ConnDiagError is ConnDiagError


def test_facts_are_attributes():
    """The facts given to an error are readable as attributes, the message as str()."""
    exc = ERRORS_BY_CONTEXT["detached"](
        "msg",
        context="detached",
        alias="default",
        vendor="mysql",
        thread_name="t",
        thread_ident=1,
        thread_native_id=2,
        pid=3,
        request_id="r",
        request_method="GET",
        request_path="/p",
        view="v",
        request_returned_ago=1.5,
        connection_id=42,
        connection_age=9.0,
        connection_opened_by_pid=3,
    )
    assert str(exc) == "msg"
    assert (exc.context, exc.alias, exc.connection_id, exc.request_returned_ago) == (
        "detached",
        "default",
        42,
        1.5,
    )
