"""Distributed quantization over MLX's ring backend, on loopback only, bounded by timeouts.

The multi-process tests start real ranks (``quantkit quantize --processes 2``, or the launcher
with a helper script) and compare the output bytes with a single-process run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import weight_bytes

from quantkit import Recipe, quantize_directory
from quantkit.distributed import (
    Distributed,
    ShardLayout,
    finish_tree,
    local_roots,
    merge_stats,
)
from quantkit.errors import DistributedError
from quantkit.hessian import HessianStats
from quantkit.launch import launch_local

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 90  # seconds: no multi-process test may hang longer than this

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available(), reason="this MLX build has no distributed backend"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_cli(args: list[str], timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# -- the shard tree, without processes ---------------------------------------------------------

def _leaf(shard: int) -> dict[str, HessianStats]:
    rng = np.random.default_rng(shard)
    x = rng.standard_normal((7 + shard, 16)).astype(np.float32)
    return {"a": HessianStats(h=mx.array(x.T @ x / len(x)), n_tokens=len(x)),
            "b": HessianStats(h=mx.zeros((4, 4)), n_tokens=0)}


@pytest.mark.parametrize("num_shards", [1, 5, 8])
def test_shard_tree_is_the_same_bytes_for_any_world_size(num_shards):
    n_batches = 11
    results = []
    for size in range(1, num_shards + 1):
        known = {}
        for rank in range(size):
            layout = ShardLayout.build(n_batches, num_shards, size, rank)
            shards = iter(range(*layout.ranges[rank]))
            roots = local_roots(layout, lambda positions, shards=shards: _leaf(next(shards)))
            assert list(roots) == layout.roots(rank)
            known.update(roots)
        results.append(np.asarray(finish_tree(known, layout.depth)["a"].h).tobytes())
    assert all(r == results[0] for r in results)


def test_layout_covers_every_batch_once():
    for size in (1, 2, 3):
        seen = []
        for rank in range(size):
            seen += ShardLayout.build(10, 8, size, rank).local_batches
        assert seen == list(range(10))
    with pytest.raises(DistributedError, match="only 2 calibration shards"):
        ShardLayout.build(10, 2, 3, 0)


def test_merge_is_exact_with_empty_parts():
    s = _leaf(3)["a"]
    assert merge_stats(s, None) is s and merge_stats(None, s) is s
    assert merge_stats(HessianStats(h=mx.zeros((16, 16)), n_tokens=0), s) is s


def test_layer_payload_round_trip_keeps_bytes_and_record():
    import attrs
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from quantkit.distributed import _decode, _encode
    from quantkit.report import LayerRecord

    layer = nn.Linear(64, 16, bias=True).to_quantized(group_size=32, bits=3)
    layer.scales = layer.scales.astype(mx.bfloat16)
    record = LayerRecord("a.b", "Linear", "quantized", strategy="gptq", rank=1, damping=0.01,
                         expert_ranks=[0, 1, 1])
    want = dict(tree_flatten(layer.parameters()))
    (meta, params), empty = _decode(_encode([
        ({"path": "a.b", "record": attrs.asdict(record)}, list(want.items())), ({}, [])]))
    assert meta["path"] == "a.b" and LayerRecord(**meta["record"]) == record
    assert empty == ({}, [])
    assert sorted(k for k, _ in params) == sorted(want)
    for k, v in params:
        assert v.dtype == want[k].dtype and v.shape == want[k].shape
        assert np.asarray(v.view(mx.uint8)).tobytes() == np.asarray(want[k].view(mx.uint8)).tobytes()


def test_single_process_group():
    d = Distributed.init()
    assert (d.rank, d.size) == (0, 1)


# -- real ranks --------------------------------------------------------------------------------

QUANT_ARGS = ["--strategy", "gptq", "--bits", "4", "--group-size", "32", "--num-samples", "16", "--seq-len", "128",
              "--shards", "4", "--timeout", "60", "--quiet"]


def test_two_ranks_in_small_slices_write_the_same_bytes(stories_dir, tinystories_text, tmp_path):
    """The launcher running two library ranks that exchange everything in 4 KiB slices."""
    kw = dict(calibration=tinystories_text, num_samples=16, seq_len=128)
    quantize_directory(stories_dir, tmp_path / "one", Recipe.uniform("gptq", 4, 32),
                       distributed=Distributed(num_shards=4), **kw)
    result = launch_local(
        lambda rank: [sys.executable, str(REPO / "tests" / "rank_job.py"), str(stories_dir),
                      str(tmp_path / "two"), str(tinystories_text), "ok"],
        2, timeout_s=JOB_TIMEOUT, env=_env(),
    )
    assert result.ok, result.describe()
    assert weight_bytes(tmp_path / "one") == weight_bytes(tmp_path / "two")


def test_two_ranks_distill_as_one_process(stories_dir, tinystories_text, tmp_path):
    """End-to-end distillation over two ranks, each holding the float hidden states of its own
    calibration sequences, their gradients summed every step: the figures and the tuned
    values of one process (up to the order of the sums)."""
    from rank_job import DISTILL

    quantize_directory(stories_dir, tmp_path / "one", DISTILL, calibration=tinystories_text,
                       num_samples=16, seq_len=128, distributed=Distributed(num_shards=4))
    result = launch_local(
        lambda rank: [sys.executable, str(REPO / "tests" / "rank_job.py"), str(stories_dir),
                      str(tmp_path / "two"), str(tinystories_text), "distill"],
        2, timeout_s=JOB_TIMEOUT, env=_env(),
    )
    assert result.ok, result.describe()
    figures = [[m["figures"] for m in json.loads((tmp_path / d / "quantization_report.json").read_text())
                ["block_methods"] if m["kind"] == "distill"][0] for d in ("one", "two")]
    assert figures[0]["kept"] and figures[1]["kept"] and figures[0]["steps"] == figures[1]["steps"] == 8
    for k in ("kl_before", "kl_after"):
        assert figures[1][k] == pytest.approx(figures[0][k], rel=1e-4)
    one, two = ({k: v for p in (tmp_path / d).glob("*.safetensors") for k, v in mx.load(str(p)).items()}
                for d in ("one", "two"))
    assert sorted(one) == sorted(two)
    for k in one:
        np.testing.assert_allclose(np.asarray(one[k].astype(mx.float32)),
                                   np.asarray(two[k].astype(mx.float32)), rtol=1e-3, atol=1e-5,
                                   err_msg=k)


def test_two_ranks_on_the_moe_fixture_write_the_same_bytes(stories_dir, tinystories_text, tmp_path):
    """``quantkit quantize --processes 2`` on the MoE fixture equals one process, and the
    report says which rank quantized each layer and each expert: the experts of one layer
    are shared by both ranks."""
    src = stories_dir.parent / "stories260K-moe4"
    if not src.is_dir():
        pytest.skip(f"{src} is absent: this test needs the ../shared models")
    args = [*QUANT_ARGS, "--calibration", str(tinystories_text)]
    quantize_directory(src, tmp_path / "one", Recipe().with_default(bits=4, group_size=32),
                       calibration=tinystories_text, num_samples=16, seq_len=128,
                       distributed=Distributed(num_shards=4))
    two = _run_cli(["quantize", str(src), "-o", str(tmp_path / "two"), *args, "--processes", "2"])
    assert two.returncode == 0, two.stderr
    assert weight_bytes(tmp_path / "one") == weight_bytes(tmp_path / "two")
    report = json.loads((tmp_path / "two" / "quantization_report.json").read_text())
    assert report["world_size"] == 2
    ranks = {r["rank"] for r in report["layers"] if r["status"] != "skipped"}
    assert ranks == {0, 1}
    expert_layers = [r for r in report["layers"] if r["expert_ranks"] is not None]
    assert len(expert_layers) == 5 * 3  # 5 blocks × gate/up/down
    for r in expert_layers:
        assert len(r["expert_ranks"]) == 4 and set(r["expert_ranks"]) == {0, 1}, r
        assert r["rank"] == 0
    single = json.loads((tmp_path / "one" / "quantization_report.json").read_text())
    assert single["world_size"] == 1
    assert {r["rank"] for r in single["layers"]} == {0}
    assert {e for r in single["layers"] for e in r["expert_ranks"] or []} == {0}
    # Apart from who did the work and how long it took, the two reports say the same.
    def what(rep):
        return [{k: v for k, v in r.items() if k not in ("rank", "expert_ranks", "time_s")}
                for r in rep["layers"]]
    assert what(report) == what(single)


def test_two_ranks_share_experts_and_starved_fallbacks(tmp_path):
    """The tiny mixtral whose expert 3 gets no tokens, in expert batches of 3: two ranks
    share every expert batch, the never-routed expert still falls back to round to nearest
    (reported with the rank that did it), and parameters and report equal one process."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from rank_job import moe_digest
    finally:
        sys.path.remove(str(REPO / "tests"))
    one = moe_digest(Distributed(num_shards=4))
    result = launch_local(
        lambda rank: [sys.executable, str(REPO / "tests" / "rank_job.py"), "-",
                      str(tmp_path / "two.json"), "-", "moe"],
        2, timeout_s=JOB_TIMEOUT, env=_env(),
    )
    assert result.ok, result.describe()
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["digest"] == one["digest"]
    assert two["report"]["world_size"] == 2
    expert_layers = [r for r in two["report"]["layers"] if r["expert_ranks"] is not None]
    assert len(expert_layers) == 2 * 3
    assert all(len(r["expert_ranks"]) == 4 for r in expert_layers)
    assert {e for r in expert_layers for e in r["expert_ranks"]} == {0, 1}
    starved = [r for r in two["report"]["layers"] if r["expert"] is not None]
    assert len(starved) == 2 * 3
    for r in starved:
        assert r["expert"] == 3 and r["strategy"] == "rtn" and r["status"] == "fallback"
        layer = next(x for x in expert_layers if x["path"] == r["path"])
        assert r["rank"] == layer["expert_ranks"][3]

    def what(rep):
        return [{k: v for k, v in r.items() if k not in ("rank", "expert_ranks", "time_s")}
                for r in rep["layers"]]
    assert what(two["report"]) == what(one["report"])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_killed_rank_fails_the_cli_cleanly(stories_dir, tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir), "-o", str(out),
         *QUANT_ARGS, "--processes", "2"],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ranks: list[int] = []
    try:
        while len(ranks) < 2 and proc.poll() is None and time.monotonic() - start < JOB_TIMEOUT:
            time.sleep(0.05)
            ranks = _children(proc.pid)
        assert len(ranks) == 2, "the launcher did not start two ranks"
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:  # the test failed: leave no launcher or rank behind
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "rank 1 of 2 was killed by SIGKILL" in " ".join(stderr.split())
    assert "Traceback" not in stderr
    assert time.monotonic() - start < JOB_TIMEOUT
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    for pid in ranks:  # no rank left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_rank_dying_mid_run_ends_the_job(stories_dir, tinystories_text, tmp_path):
    """Rank 1 kills itself (SIGKILL) when it reaches block 2; rank 0 is then waiting in a
    collective. The job ends quickly, names rank 1, and writes nothing."""
    out = tmp_path / "out"
    start = time.monotonic()
    result = launch_local(
        lambda rank: [sys.executable, str(REPO / "tests" / "rank_job.py"), str(stories_dir), str(out),
                      str(tinystories_text), "kill"],
        2, timeout_s=JOB_TIMEOUT, env=_env(),
    )
    assert not result.ok and not result.timed_out
    assert result.failed_rank == 1 and result.returncodes[1] == -signal.SIGKILL
    assert result.returncodes[0] != 0
    assert "rank 1 of 2 was killed by SIGKILL" in result.describe()
    assert result.elapsed_s < JOB_TIMEOUT and time.monotonic() - start < JOB_TIMEOUT
    assert not out.exists()


def test_stalled_rank_makes_its_peer_give_up(stories_dir, tinystories_text, tmp_path, capfd):
    """Rank 1 stops making progress at block 2: rank 0 waits at most its timeout (3 s) in
    the next collective, says so and exits 1; the launcher then stops rank 1."""
    out = tmp_path / "out"
    result = launch_local(
        lambda rank: [sys.executable, str(REPO / "tests" / "rank_job.py"), str(stories_dir),
                      str(out), str(tinystories_text), "hang"],
        2, timeout_s=JOB_TIMEOUT, env=_env(), grace_s=1,
    )
    assert result.failed_rank == 0 and result.returncodes[0] == 1
    assert result.elapsed_s < 60
    assert "rank 0: no progress for 3 s while" in " ".join(capfd.readouterr().err.split())
    assert not out.exists()


def _lone_rank(hostfile: Path, out: Path, timeout: str = "3") -> subprocess.CompletedProcess:
    """Rank 0 of a two-rank hostfile, started alone with the CLI."""
    env = {**_env(), "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    return subprocess.run(
        [sys.executable, "-m", "quantkit.cli", "quantize", "model-not-read", "-o", str(out),
         "--distributed", "--timeout", timeout, "-q"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split())
    assert text.startswith("error: "), stderr
    assert "Traceback" not in stderr and "Timeout (" not in stderr, stderr
    return text


def test_missing_peer_times_out_with_a_clear_error(tmp_path):
    """Rank 0 of a two-rank hostfile whose peer never starts gives up after --timeout with
    one line naming the hostfile and the fix, exit status 1, no stack dump."""
    from quantkit.launch import write_hostfile

    hostfile = write_hostfile(tmp_path / "hosts.json", 2)
    start = time.monotonic()
    proc = _lone_rank(hostfile, tmp_path / "out")
    assert proc.returncode == 1
    text = _one_error_line(proc.stderr)
    assert f"rank 0 of 2 (hostfile {hostfile})" in text
    assert "did not connect within 3 s" in text and "start every rank" in text
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def test_port_in_use_fails_at_once_with_a_clear_error(tmp_path):
    """The port of rank 0 in the hostfile is held by another socket: one line saying so."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        addr = f"127.0.0.1:{held.getsockname()[1]}"
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[addr], ["127.0.0.1:1"]]))
        start = time.monotonic()
        proc = _lone_rank(hostfile, tmp_path / "out", timeout="60")
    assert proc.returncode == 1
    text = _one_error_line(proc.stderr)
    assert f"cannot listen on {addr}: the address is in use" in text
    assert str(hostfile) in text
    assert time.monotonic() - start < 30


def test_same_result_in_process_with_size_one_group(stories_dir, tinystories_text, tmp_path):
    """``quantize_directory`` with an explicit size-1 group equals the default call."""
    kw = dict(calibration=tinystories_text, num_samples=8, seq_len=64)
    a = quantize_directory(stories_dir, tmp_path / "a", Recipe.uniform("gptq", 4, 32), **kw)
    b = quantize_directory(stories_dir, tmp_path / "b", Recipe.uniform("gptq", 4, 32),
                           distributed=Distributed.init(), **kw)
    assert a.report.world_size == b.report.world_size == 1
    assert weight_bytes(a.out_dir) == weight_bytes(b.out_dir)
