"""SIGINT and SIGTERM as exceptions, so that a signalled run takes the same way out as a failed one.

Theory of operation
-------------------
Python's default SIGTERM ends the process at once: no `finally`, no `__exit__`, so stage
processes lose their stop message, the launcher's temporary folder stays behind and the results of
completed requests are never written. Its default SIGINT raises `KeyboardInterrupt`, which click
turns into "Aborted!" and exit code 1. Inside `signals_raise()` both raise `Interrupted` instead: a
`SystemExit` whose code is the shell's 128 + signal number (130 for Ctrl-C, 143 for SIGTERM), so
it passes `except Exception` untouched, unwinds through every cleanup, and — if nothing catches it
— ends the process with that code.

Cleanup must not itself be cut short, so code under `shielded()` (stopping the stages, writing
what is done) defers a signal to the shield's end. Once `Interrupted` has been raised, later
signals are ignored: the process is already on its way out, and every cleanup step is bounded in
time (`runtime.launcher.Cluster.close` waits at most ~3 s for its children).

Leaving `signals_raise()` restores the previous handlers, except after `Interrupted`: then both
signals stay ignored, because the caller is on its way out with that exit code and what it still
does (`flowspec run` writes the comparison of finished policies) should not be cut short by a
second Ctrl-C.

Signal handlers belong to the main thread; elsewhere (a test driving a cluster from a thread) these
context managers do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """SIGINT or SIGTERM arrived; the exit code is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class _Disposition:
    """The process's one signal state (signals are per process, so this is too)."""

    def __init__(self) -> None:
        self.installed = 0  # nesting depth of `signals_raise`
        self.shield = 0  # nesting depth of `shielded`
        self.deferred: int | None = None  # a signal that arrived under a shield
        self.raised = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raised:
            return  # already unwinding; see the module docstring
        if self.shield:
            self.deferred = signum
            return
        self.raised = True
        raise Interrupted(signum)


_state = _Disposition()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted`; the previous handlers come back
    after it, unless one of them was raised (then they stay ignored: see the module docstring)."""
    if not _main_thread() or _state.installed:
        yield
        return
    previous = {s: signal.signal(s, _state.handle) for s in SIGNALS}
    _state.installed += 1
    try:
        yield
    finally:
        _state.installed -= 1
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if _state.raised else handler)
        _state.raised, _state.deferred = False, None


@contextmanager
def shielded() -> Iterator[None]:
    """Run the block to its end even if a signal arrives; the signal is raised after it (once)."""
    _state.shield += 1
    try:
        yield
    finally:
        _state.shield -= 1
        if _state.shield == 0 and _state.deferred is not None and not _state.raised and _main_thread():
            signum, _state.deferred = _state.deferred, None
            _state.raised = True
            raise Interrupted(signum)
