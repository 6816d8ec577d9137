"""conndiag's exceptions: one base class, one subclass per context, facts as attributes."""

from __future__ import annotations

import pickle

import pytest

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


def _facts() -> dict[str, object]:
    return {
        "context": "detached",
        "alias": "default",
        "vendor": "mysql",
        "thread_name": "t",
        "thread_ident": 1,
        "thread_native_id": 2,
        "pid": 3,
        "request_id": "r",
        "request_method": "GET",
        "request_path": "/p",
        "view": "v",
        "request_returned_ago": 1.5,
        "connection_id": 42,
        "connection_age": 9.0,
        "connection_opened_by_pid": 3,
    }


@pytest.mark.parametrize("cls", sorted(ERRORS_BY_CONTEXT.values(), key=lambda c: c.__name__))
def test_every_error_pickles_with_its_message_and_facts(cls):
    """Each refusal survives pickle (the parallel test runner, multiprocessing, Celery result
    backends send exceptions between processes): same class, message and attributes."""
    exc = cls("the message", **_facts())
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(exc, protocol=protocol))
        assert type(back) is cls
        assert str(back) == "the message"
        assert back.args == ("the message",)
        assert {name: getattr(back, name) for name in _facts()} == _facts()


def test_base_error_and_real_refusal_pickle():
    """The base class pickles, and so does a refusal built by the policy from live state."""
    from conndiag import policy, threads

    base = pickle.loads(pickle.dumps(ConnDiagError("plain")))
    assert type(base) is ConnDiagError and str(base) == "plain"
    info = threads.current()
    refused = policy.refusal("detached", "default", "sqlite", None, info, None)
    back = pickle.loads(pickle.dumps(refused))
    assert str(back) == str(refused)
    assert back.thread_native_id == info.native_id and back.connection_id is None


def test_pickled_facts_are_every_keyword_of_init():
    """FACTS (what pickling keeps) names exactly the keyword-only facts of ``__init__``."""
    import inspect

    from conndiag.exceptions import FACTS

    params = inspect.signature(UnsafeQueryError.__init__).parameters.values()
    assert tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY) == FACTS
