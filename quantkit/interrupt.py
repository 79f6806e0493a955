"""One signal policy: Ctrl-C (SIGINT) and SIGTERM set a flag; the work stops where it checks it.

A handler that raises ``KeyboardInterrupt`` can lose the exception: raised while C code runs
(NumPy's BLAS in :class:`quantkit.host.HostLinear`, then ``mx.array(result)``), it can be
swallowed by the extension and the run goes on to write its output. A flag cannot be lost. The
handlers installed by :func:`handling` (the CLI installs them; the library installs none) only
record the signal; :func:`check`, called by the library at every batch and block boundary and
in every long phase (loading, planning, calibration, solving, writing), raises
:class:`Interrupted` once a signal has been recorded, and keeps raising it on every later call,
so an exception swallowed by foreign code is raised again at the next boundary. A second
SIGINT while the first is being honoured ends the process at once (``on_force``).

Test hook (documented in docs/reliability.md): with ``QUANTKIT_PAUSE_AT=PHASE[#N]:FILE`` in the
environment, the ``N``-th (default: first) :func:`check` of phase ``PHASE`` creates ``FILE`` and
waits there (up to 60 s) for a signal, so a test can interrupt a run at a known phase without
racing it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: The signals handled, and the exit status each one ends the CLI with (128 + signal number).
SIGNALS = (signal.SIGINT, signal.SIGTERM)
PAUSE_ENV = "QUANTKIT_PAUSE_AT"


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`check` once SIGINT or SIGTERM arrived. A ``KeyboardInterrupt`` (not an
    ``Exception``), so ``except Exception`` blocks do not turn it into another error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process stopped by this signal: 130, 143."""
        return 128 + self.signum


_received: int | None = None


def _read_pause() -> list | None:
    """``[phase, checks left before pausing, marker file]`` from ``QUANTKIT_PAUSE_AT``."""
    phase, sep, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    phase, _, count = phase.partition("#")
    if not (phase and sep and marker) or (count and not count.isdigit()):
        return None
    return [phase, int(count or 1), marker]


_pause = _read_pause()


def requested() -> int | None:
    """The signal received, or ``None``."""
    return _received


def check(phase: str | None = None) -> None:
    """Raise :class:`Interrupted` if SIGINT or SIGTERM was received. ``phase`` names where the
    caller is (``"load"``, ``"block"``, ``"write"``...), for the test hook."""
    if _pause is not None and phase == _pause[0]:
        _pause[1] -= 1
        if _pause[1] <= 0:
            _wait_here(_pause[2])
    if _received is not None:
        raise Interrupted(_received)


def _wait_here(marker: str) -> None:
    global _pause
    _pause = None  # pause once
    Path(marker).touch()
    deadline = time.monotonic() + 60
    while _received is None and time.monotonic() < deadline:
        time.sleep(0.01)


def reset() -> None:
    """Forget a received signal (a new command starts)."""
    global _received
    _received = None


def _default_force(signum: int) -> None:
    os._exit(128 + signum)


def _handler(on_force: Callable[[int], None]):
    def handle(signum, frame):
        global _received
        if _received is not None and signum == signal.SIGINT:
            on_force(signum)  # a second Ctrl-C: the user does not want to wait
            return
        if _received is None:
            _received = signum
    return handle


@contextlib.contextmanager
def handling(on_force: Callable[[int], None] = _default_force) -> Iterator[None]:
    """While active, SIGINT and SIGTERM only set the flag :func:`check` reads; the previous
    handlers come back on exit and the flag is cleared (a signal that arrived before, e.g.
    during start-up imports, is kept until then). Outside the main thread (where Python cannot set handlers)
    nothing changes. ``on_force(signum)``: called on a second SIGINT (default: exit at once
    with status 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _handler(on_force)
    previous = {s: signal.signal(s, handler) for s in _handled()}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        reset()  # honoured (or the work ended anyway): the next command starts clean


def install(on_force: Callable[[int], None] = _default_force) -> None:
    """Install the handlers for the rest of the process (the CLI's first statement, so that a
    signal during start-up imports is honoured too)."""
    if threading.current_thread() is threading.main_thread():
        handler = _handler(on_force)
        for s in _handled():
            signal.signal(s, handler)


def _handled() -> list[int]:
    """The signals to handle: those not ignored. A shell starts background jobs with SIGINT
    ignored (and ``nohup`` ignores SIGHUP): the convention is kept, as Python itself does."""
    return [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def ignore() -> None:
    """Ignore SIGINT and SIGTERM from now on: the program's work is over (its output complete,
    its exit status decided). Python puts the default handlers back while it shuts down, so a
    signal then would end a finished run by that signal instead of its own exit status."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
