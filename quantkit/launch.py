"""Start the ranks of a distributed run on this machine and watch them.

``mlx.launch`` starts ranks too (and across hosts, over ssh), but it exits 0 even when ranks
die, and while it waits it keeps a core busy. This launcher is for one machine: it starts
``n`` processes with ``MLX_RANK`` and ``MLX_HOSTFILE`` set for MLX's ring backend over
127.0.0.1, polls them, and as soon as one fails stops the others (SIGTERM, then SIGKILL), so a
dead rank ends the whole job instead of leaving its peers waiting. Data only: the CLI prints.

Rank lifetime: ranks never outlive their launcher. Each rank runs in its own session (so a
terminal's Ctrl-C reaches only the launcher, which stops the ranks itself, SIGTERM then SIGKILL,
whole process groups); a launcher that is killed outright (SIGKILL, no chance to clean up)
takes its ranks with it through :func:`follow_launcher`, which each rank calls at start-up
(``QUANTKIT_LAUNCHER_PID`` names the launcher): on Linux the kernel's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``), elsewhere a watchdog thread polling the parent pid. The
hostfile directory ``quantkit-launch-PID-*`` in the temporary directory is removed on exit, and
one left by a killed launcher is removed by the next launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import attrs

from .interrupt import check
from .io import process_alive

#: Set in every rank's environment: the launcher's process id (see :func:`follow_launcher`).
LAUNCHER_PID = "QUANTKIT_LAUNCHER_PID"
TEMP_PREFIX = "quantkit-launch-"


@attrs.frozen
class LaunchResult:
    """``returncodes[r]``: rank ``r``'s exit status (negative: killed by that signal; ``None``:
    never finished). ``failed_rank``: the first rank seen failing; ``timed_out``: the job ran
    past its time limit and was stopped."""

    returncodes: tuple[int | None, ...]
    failed_rank: int | None
    timed_out: bool
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.failed_rank is None and not self.timed_out

    def describe(self) -> str:
        """One line saying what went wrong (empty when the job succeeded)."""
        if self.timed_out:
            return (f"the job ran past its time limit ({self.elapsed_s:.0f} s); "
                    "stopped every rank")
        if self.failed_rank is None:
            return ""
        code = self.returncodes[self.failed_rank]
        if code in (130, 143):
            how = f"was interrupted ({signal.Signals(code - 128).name})"
        elif code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        return (f"rank {self.failed_rank} of {len(self.returncodes)} {how}; "
                "stopped the other ranks")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (the OS picks them)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def write_hostfile(path: str | Path, n: int, host: str = "127.0.0.1") -> Path:
    """A ring-backend hostfile for ``n`` ranks on ``host``: ``[["127.0.0.1:P0"], ...]``."""
    path = Path(path)
    path.write_text(json.dumps([[f"{host}:{p}"] for p in free_ports(n, host)]))
    return path


def launch_local(
    command: Callable[[int], Sequence[str]], n: int, *, timeout_s: float | None = None,
    env: dict[str, str] | None = None, grace_s: float = 5.0, poll_s: float = 0.1,
) -> LaunchResult:
    """Run ``command(rank)`` for ranks ``0..n-1`` on this machine, joined by the ring backend
    over 127.0.0.1. Returns when all succeeded, or right after one failed (the others are
    stopped), or after ``timeout_s``. Never leaves a child running; a SIGINT or SIGTERM to the
    launcher (see :mod:`quantkit.interrupt`) stops every rank and raises
    :class:`~quantkit.interrupt.Interrupted`."""
    start = time.monotonic()
    procs: list[subprocess.Popen] = []
    remove_stale_launch_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        hostfile = write_hostfile(Path(tmp) / "hosts.json", n)
        base = dict(os.environ if env is None else env)
        base[LAUNCHER_PID] = str(os.getpid())
        try:
            for rank in range(n):
                check("launch")
                child_env = {**base, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
                procs.append(subprocess.Popen(list(command(rank)), env=child_env,
                                              start_new_session=True))
            failed, timed_out = _watch(procs, start, timeout_s, poll_s)
        finally:
            _stop(procs, grace_s)
    return LaunchResult(
        returncodes=tuple(p.returncode for p in procs), failed_rank=failed,
        timed_out=timed_out, elapsed_s=time.monotonic() - start,
    )


def _watch(procs, start, timeout_s, poll_s) -> tuple[int | None, bool]:
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:  # a rank killed by a signal is the cause; its peers' errors the effect
            return min(failed, key=lambda r: (codes[r] >= 0, r)), False
        if all(code == 0 for code in codes):
            return None, False
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return None, True
        check("watch")
        time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every child still running, SIGKILL those still there after ``grace_s``; each
    signal goes to the child's whole process group (it leads one: ``start_new_session``)."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            _wait(p, max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            _wait(p, None)


def _wait(p: subprocess.Popen, timeout: float | None) -> None:
    """``p.wait(timeout)``, not cut short by a ``KeyboardInterrupt`` (a second Ctrl-C under
    Python's default handler) so that no rank is left running."""
    while True:
        try:
            p.wait(timeout)
            return
        except KeyboardInterrupt:
            continue


def _signal_group(p: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(p.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
    except AttributeError:  # pragma: no cover - no process groups (Windows)
        p.send_signal(signum)


def remove_stale_launch_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove ``quantkit-launch-PID-*`` directories of launchers that no longer run (killed
    before they could clean up). Returns what was removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = path.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


_PR_SET_PDEATHSIG = 1


def follow_launcher(pid: int, poll_s: float = 0.5) -> None:
    """Make this process (a rank) die with launcher ``pid``: SIGKILL from the kernel when its
    parent exits (Linux ``prctl``), else a daemon thread that kills this process once its parent
    is no longer ``pid``. Ends the process at once if the launcher is already gone."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != pid:  # the launcher died before the signal was armed
        os._exit(128 + signal.SIGKILL)
    if not armed:
        threading.Thread(target=_watch_parent, args=(pid, poll_s), daemon=True,
                         name="quantkit-follow-launcher").start()


def _watch_parent(pid: int, poll_s: float) -> None:
    while os.getppid() == pid:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGKILL)
