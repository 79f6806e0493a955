"""Start the ranks of a distributed run on this machine and watch them.

``mlx.launch`` starts ranks too (and across hosts, over ssh), but it exits 0 even when ranks
die, and while it waits it keeps a core busy. This launcher is for one machine: it starts
``n`` processes with ``MLX_RANK`` and ``MLX_HOSTFILE`` set for MLX's ring backend over
127.0.0.1, polls them, and as soon as one fails stops the others (SIGTERM, then SIGKILL), so a
dead rank ends the whole job instead of leaving its peers waiting. Data only: the CLI prints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import attrs


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
        if code is not None and code < 0:
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
    stopped), or after ``timeout_s``. Never leaves a child running."""
    start = time.monotonic()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-launch-") as tmp:
        hostfile = write_hostfile(Path(tmp) / "hosts.json", n)
        base = dict(os.environ if env is None else env)
        try:
            for rank in range(n):
                child_env = {**base, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
                procs.append(subprocess.Popen(list(command(rank)), env=child_env))
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
        time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every child still running, SIGKILL those still there after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
