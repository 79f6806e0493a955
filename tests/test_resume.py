"""Determinism and resume: same inputs and seed give byte-identical safetensors, and a run
killed with SIGKILL after a block checkpoint continues with --resume to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import weight_bytes
from typer.testing import CliRunner

from quantkit import Recipe, quantize_directory
from quantkit.checkpoint import checkpoint_dir, read_progress
from quantkit.cli import app

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--num-samples", "16", "--seq-len", "128", "--group-size", "32", "--seed", "3", "-q"]


def test_same_seed_same_bytes(stories_dir, tinystories_text, tmp_path):
    kw = dict(calibration=tinystories_text, num_samples=8, seq_len=128, seed=5)
    recipe = Recipe.uniform(bits=3, group_size=32)
    a = quantize_directory(stories_dir, tmp_path / "a", recipe, checkpoint=False, **kw)
    b = quantize_directory(stories_dir, tmp_path / "b", recipe, **kw)
    assert weight_bytes(a.out_dir) == weight_bytes(b.out_dir)
    assert (a.out_dir / "config.json").read_bytes() == (b.out_dir / "config.json").read_bytes()


def _wait_for_block(proc: subprocess.Popen, ckpt: Path, timeout: float = 60.0) -> int:
    """Poll until the checkpoint holds a finished block; then return how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = read_progress(ckpt)
        if done:
            return done
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before any checkpoint: {err[-2000:]}")
        time.sleep(0.005)
    pytest.fail(f"no block checkpoint in {ckpt} after {timeout} s")


def _kill_when(proc: subprocess.Popen, out: Path, ready):
    """SIGKILL ``proc`` once ``ready()`` returns (its value is returned); the run must not have
    written ``out`` by then."""
    try:
        value = ready()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before it was killed; nothing was tested"
    return value


def test_sigkill_then_resume_is_byte_identical(stories_dir, tinystories_text, tmp_path):
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir),
           "--calibration", str(tinystories_text), *ARGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "-o", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = _kill_when(proc, out, lambda: _wait_for_block(proc, checkpoint_dir(out)))
    assert 1 <= done <= (read_progress(checkpoint_dir(out)) or 0)

    resumed = subprocess.run([*cmd, "-o", str(out), "--resume"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint_dir(out).exists()
    assert not list(tmp_path.glob(".killed.*"))  # stale partial dirs of the killed run removed

    ref = tmp_path / "ref"
    result = CliRunner().invoke(app, ["quantize", str(stories_dir), "-o", str(ref),
                                      "--calibration", str(tinystories_text), *ARGS, "--no-checkpoint"])
    assert result.exit_code == 0, result.output
    assert weight_bytes(out) == weight_bytes(ref)
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    import mlx_lm

    model, _ = mlx_lm.load(str(out))  # the resumed output is a normal mlx-lm model dir
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    report = json.loads((out / "quantization_report.json").read_text())
    assert len(report["layers"]) == len(json.loads((ref / "quantization_report.json").read_text())["layers"])


def test_sigkill_during_distillation_then_resume_is_byte_identical(stories_dir, tinystories_text,
                                                                    tmp_path):
    """Killed after every block is checkpointed, in the end-to-end distillation: ``--resume``
    recomputes the float model's final hidden states from the model's files, runs the stage
    again and writes the bytes of an uninterrupted run."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[default]\nstrategy = "gptq"\nbits = 3\ngroup_size = 32\n\n'
                      "[distill]\nepochs = 8\nlr = 3e-6\n")  # long enough to be killed in
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir), "--recipe", str(recipe),
           "--calibration", str(tinystories_text), *ARGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    blocks = json.loads((stories_dir / "config.json").read_text())["num_hidden_layers"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "-o", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def every_block_done() -> None:
        deadline = time.monotonic() + 120
        while (read_progress(checkpoint_dir(out)) or 0) < blocks and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.5)  # into the stage (the layers outside the blocks are quick)

    _kill_when(proc, out, every_block_done)
    assert read_progress(checkpoint_dir(out)) == blocks

    resumed = subprocess.run([*cmd, "-o", str(out), "--resume"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref = tmp_path / "ref"
    result = CliRunner().invoke(app, ["quantize", str(stories_dir), "-o", str(ref), "--recipe", str(recipe),
                                      "--calibration", str(tinystories_text), *ARGS, "--no-checkpoint"])
    assert result.exit_code == 0, result.output
    assert weight_bytes(out) == weight_bytes(ref)
    figures = [[m["figures"] for m in json.loads((d / "quantization_report.json").read_text())["block_methods"]
                if m["kind"] == "distill"][0] for d in (out, ref)]
    assert figures[0]["kept"] and figures[0]["kl_after"] == figures[1]["kl_after"]
