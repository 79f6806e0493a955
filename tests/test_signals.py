"""Stopping a run: the real ``quantkit`` program (``python -m quantkit.cli``) is sent SIGINT or
SIGTERM at a known phase (the ``QUANTKIT_PAUSE_AT`` hook, see quantkit/interrupt.py), with one
process and with ``--processes 2``; its launcher is killed outright. Each stop must end within
seconds with exit 130/143, one line on stderr, no output, no partial directory, no rank left
running, no temporary directory left, and the run must then complete (``--resume``:
byte-identical to an uninterrupted run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import weight_bytes
from typer.testing import CliRunner

from quantkit.cli import app

REPO = Path(__file__).resolve().parents[1]
#: Plumbing tests: the pipeline without its block methods (--fast); quicker, same paths.
FAST = ["--num-samples", "8", "--seq-len", "64", "--group-size", "32", "-q", "--fast"]
runner = CliRunner()


def _args(stories_dir, text, out, *extra) -> list[str]:
    return ["quantize", str(stories_dir), "-o", str(out), "--calibration", str(text), *FAST,
            *map(str, extra)]


def _env(tmp_path: Path, pause: str | None = None) -> dict[str, str]:
    # TMPDIR is left alone: MLX keeps its compiled CPU kernels there, and two ranks compiling
    # into a fresh, empty one race (an MLX issue, not this test's subject).
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANTKIT_PAUSE_AT", None)
    if pause:
        env["QUANTKIT_PAUSE_AT"] = f"{pause}:{tmp_path / 'paused'}"
    return env


def _default_signals() -> None:
    """In the child, before exec: SIGINT handled by default, even when the test run itself was
    started as a background job (a non-interactive shell starts those with SIGINT ignored, the
    child would inherit that, and Python keeps an inherited SIG_IGN: Ctrl-C is then off by
    design, which is not what these tests are about)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantkit.cli", *args], env=env,
                            preexec_fn=_default_signals if os.name == "posix" else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before pausing: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the pause point")
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a moment to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _launch_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"quantkit-launch-{pid}-*"))


def _leftovers(tmp_path: Path, launcher: int | None = None) -> list[str]:
    """Output, hidden partial/old directories and the launcher's temporary directory."""
    found = [p.name for p in tmp_path.iterdir() if p.name == "o" or p.name.startswith(".o.")
             and not p.name.endswith(".checkpoint")]
    return found + [p.name for p in _launch_dirs(launcher)] if launcher else found


@pytest.fixture(scope="module")
def reference(stories_dir, tinystories_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    result = runner.invoke(app, _args(stories_dir, tinystories_text, out))
    assert result.exit_code == 0, result.output
    return weight_bytes(out)


# phase (see QUANTKIT_PAUSE_AT), signal, finished blocks left in the checkpoint
PHASES = [
    ("imports", signal.SIGINT, None),     # before MLX / mlx-lm are imported
    ("load", signal.SIGTERM, None),       # the model was just read
    ("capture", signal.SIGINT, None),     # capturing the first block's inputs
    ("forward#4", signal.SIGTERM, 3),     # block 3's calibration batch (one batch a block)
    ("block#3", signal.SIGINT, 2),        # between blocks
    ("layer#20", signal.SIGTERM, 3),      # solving block 3's layers
    ("write", signal.SIGINT, 5),          # the output is written, not yet renamed into place
]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("phase, sig, blocks", PHASES, ids=[p[0] for p in PHASES])
def test_signal_at_each_phase_one_process(stories_dir, tinystories_text, tmp_path, reference,
                                          phase, sig, blocks):
    args = _args(stories_dir, tinystories_text, tmp_path / "o")
    proc = _start(args, _env(tmp_path, phase))
    _wait_for(tmp_path / "paused", proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + sig, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: interrupted ({sig.name})")
    assert _leftovers(tmp_path) == []
    ckpt = tmp_path / ".o.checkpoint"
    if blocks:
        assert f"{blocks} finished blocks are checkpointed" in lines[0]
    else:
        assert "nothing was written" in lines[0] and not ckpt.exists()
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert weight_bytes(tmp_path / "o") == reference
    assert not ckpt.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("phase, sig", [("block#2", signal.SIGINT), ("write", signal.SIGTERM)])
def test_signal_to_the_launcher_stops_every_rank(stories_dir, tinystories_text, tmp_path,
                                                 phase, sig):
    args = _args(stories_dir, tinystories_text, tmp_path / "o", "--processes", "2")
    env = _env(tmp_path, phase)
    proc = _start(args, env)
    _wait_for(tmp_path / "paused", proc)
    ranks = _children(proc.pid)
    # While rank 0 writes, rank 1 has passed the last barrier and may already have exited.
    assert len(ranks) == 2 if phase != "write" else 1 <= len(ranks) <= 2
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: interrupted ({sig.name}); stopped every rank")
    assert not any(_running(r) for r in ranks)
    assert _leftovers(tmp_path, proc.pid) == []
    env.pop("QUANTKIT_PAUSE_AT")
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert weight_bytes(tmp_path / "o") and _leftovers(tmp_path) == ["o"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ranks_die_with_a_killed_launcher(stories_dir, tinystories_text, tmp_path):
    """SIGKILL gives the launcher no chance to stop its ranks: they die with it (parent-death
    signal) and write nothing; its temporary directory is removed by the next launch."""
    args = _args(stories_dir, tinystories_text, tmp_path / "o", "--processes", "2")
    env = _env(tmp_path, "block#2")
    proc = _start(args, env)
    _wait_for(tmp_path / "paused", proc)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(_running(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(r) for r in ranks)
    time.sleep(0.5)
    assert not (tmp_path / "o").exists()
    assert _launch_dirs(proc.pid)  # SIGKILL: no cleanup
    env.pop("QUANTKIT_PAUSE_AT")
    done = subprocess.run([sys.executable, "-m", "quantkit.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _leftovers(tmp_path, proc.pid) == ["o"]  # the next launch removed it


def test_started_by_a_launcher_without_distributed(stories_dir, tinystories_text, tmp_path):
    """mlx.launch (or mpirun) without --distributed: refused at once, naming the flag."""
    for env in ({"MLX_RANK": "1", "MLX_HOSTFILE": "/x.json"}, {"OMPI_COMM_WORLD_SIZE": "2"}):
        result = runner.invoke(app, _args(stories_dir, tinystories_text, tmp_path / "o"), env=env)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--distributed" in lines[0], result.stderr
        assert next(iter(env)) in lines[0]
    assert not (tmp_path / "o").exists()
    single = runner.invoke(app, _args(stories_dir, tinystories_text, tmp_path / "o", "--strategy",
                                      "rtn"), env={"OMPI_COMM_WORLD_SIZE": "1"})
    assert single.exit_code == 0, single.output  # mpirun -np 1: one process, nothing to join


def test_interrupt_check_is_sticky_and_handlers_are_restored():
    """A flag, not an exception: once a signal arrived, every check raises (an exception lost in
    foreign code is raised again at the next boundary); the previous handlers come back."""
    from quantkit import interrupt

    before = signal.getsignal(signal.SIGTERM)
    with interrupt.handling():
        interrupt.check()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        for _ in range(2):
            with pytest.raises(interrupt.Interrupted) as info:
                interrupt.check()
            assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    interrupt.check()  # the flag is cleared with the handlers


def test_second_ctrl_c_forces_exit():
    """Ctrl-C while the first is being honoured calls on_force (the CLI: exit at once); a second
    SIGTERM does not (a scheduler's repeated SIGTERM just waits for the clean stop)."""
    from quantkit import interrupt

    forced = []
    # SIGINT handled as in a terminal, also when the test run is a background job (started
    # with SIGINT ignored, which interrupt.handling keeps, as Python does)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupt.handling(on_force=forced.append):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert forced == [] and interrupt.requested() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert forced == [signal.SIGINT]
            assert interrupt.requested() == signal.SIGTERM  # the first signal decides the exit code
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_during_target_bpw_planning(stories_dir, tinystories_text, tmp_path):
    """The sensitivity pass of --target-bpw stops like the rest (it used to die silently)."""
    args = _args(stories_dir, tinystories_text, tmp_path / "o", "--target-bpw", "10")
    proc = _start(args, _env(tmp_path, "plan"))
    _wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (SIGTERM); nothing was written")
    assert _leftovers(tmp_path) == [] and not (tmp_path / ".o.checkpoint").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_parent_watchdog_without_pdeathsig(tmp_path):
    """Where the kernel has no parent-death signal (macOS), a watchdog thread ends an orphaned
    rank: a parent starts a child that watches it, the parent is killed, the child dies."""
    ready = tmp_path / "watching"
    # The child is told its parent's pid and says when it watches (its imports may take seconds
    # on a loaded machine); its output goes nowhere, so the parent's pipe closes with the parent.
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys, time; "
        "from quantkit.launch import _watch_parent; import threading; "
        "threading.Thread(target=_watch_parent, args=(int(sys.argv[1]), 0.05), daemon=True).start(); "
        "open(sys.argv[2], \"w\").close(); time.sleep(300)', str(os.getpid()), sys.argv[1]], "
        "stdout=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(ready)], env=_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists() and _running(child)
    parent.kill()
    parent.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the orphaned child outlived its parent by 30 s")
