"""The runtime fans records out to recorders and contains their failures."""

from __future__ import annotations

from conndiag import conf, runtime


class Recorder:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.calls: list[tuple] = []

    def connection_closed(self, state, reason):
        if self.fail:
            raise ValueError("nope")
        self.calls.append((state, reason))

    def internal_error(self, component, error, first):
        self.calls.append(("internal", component, first))


def test_one_failing_recorder_does_not_stop_the_others():
    """emit() calls every recorder; a failure is counted and reported once per kind."""
    good, bad = Recorder(False), Recorder(True)
    rt = runtime.Runtime(conf.parse({}), [bad, good])
    rt.emit("connection_closed", "s", "explicit")
    rt.emit("connection_closed", "s", "explicit")
    assert ("s", "explicit") in good.calls
    assert rt.internal_errors == 2
    firsts = [c[2] for c in good.calls if c[0] == "internal"]
    assert firsts == [True, False]


def test_runtime_is_rebuilt_after_reset():
    """reset() drops the runtime; get() builds it from the current settings."""
    first = runtime.get()
    assert runtime.get() is first
    runtime.reset()
    assert runtime.get() is not first
