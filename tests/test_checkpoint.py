"""The checkpoint is the finished blocks' output shards: verified before use (a damaged, edited
or rolled-back checkpoint is refused with one line, never resumed into a wrong model and never
deleted on its own), fingerprinted by the weights' content, and ``--resume`` is always safe."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from conftest import weight_bytes
from typer.testing import CliRunner

from quantkit.checkpoint import checkpoint_dir, read_progress
from quantkit.cli import app
from quantkit.walker import ModelWalker

runner = CliRunner()
#: Plumbing tests: the pipeline without its block methods (--fast); quicker, same paths.
FAST = ["--num-samples", "8", "--seq-len", "64", "--group-size", "32", "-q", "--fast"]


@pytest.fixture
def quantize(tinystories_text):
    def run(model_dir, out, *extra):
        return runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--calibration",
                                   str(tinystories_text), *FAST, *map(str, extra)])
    return run


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return " ".join(lines[0].split())


def stopped_at_block_2(quantize, model_dir, out, monkeypatch) -> None:
    """Run ``quantize`` and stop it (Ctrl-C) while it quantizes block 2."""
    original = ModelWalker._quantize_all

    def stop(self, model, plans, stats, report, block_index, **kw):
        if block_index == 2:
            raise KeyboardInterrupt
        return original(self, model, plans, stats, report, block_index, **kw)

    with monkeypatch.context() as m:
        m.setattr(ModelWalker, "_quantize_all", stop)
        one_line_error(quantize(model_dir, out), code=130)


@pytest.fixture
def interrupted(quantize, stories_dir, tmp_path, monkeypatch):
    """A copy of stories260K and a run of it stopped (Ctrl-C) while quantizing block 2."""
    src = tmp_path / "model"
    shutil.copytree(stories_dir, src)
    out = tmp_path / "o"
    stopped_at_block_2(quantize, src, out, monkeypatch)
    assert read_progress(checkpoint_dir(out)) == 2
    return src, out


def test_resume_is_byte_identical_and_keeps_no_activations(quantize, interrupted, tmp_path):
    src, out = interrupted
    ckpt = checkpoint_dir(out)
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == \
        ["block-0000.safetensors", "block-0001.safetensors"]  # block shards only, no inputs
    assert quantize(src, out, "--resume").exit_code == 0
    ref = tmp_path / "ref"
    assert quantize(src, ref, "--no-checkpoint").exit_code == 0
    assert weight_bytes(out) == weight_bytes(ref)
    assert not ckpt.exists()


@pytest.fixture
def slow_scan(monkeypatch):
    """The weight scan held until ``release`` is set (a large model's hashes still running)."""
    import threading

    import quantkit.api as api

    release = threading.Event()
    original = api.scan_weights

    def held(*a, **kw):
        release.wait(60)
        return original(*a, **kw)

    monkeypatch.setattr(api, "scan_weights", held)
    yield release
    release.set()


def test_blocks_go_on_while_the_weights_are_hashed(quantize, stories_dir, slow_scan,
                                                  monkeypatch, tmp_path):
    """A fresh run does not wait for the fingerprint: its first blocks are written uncommitted
    (no progress.json) and committed together once the hashes are known; same bytes."""
    out = tmp_path / "o"
    ckpt = checkpoint_dir(out)
    original = ModelWalker._quantize_all
    seen = {}

    def watch(self, model, plans, stats, report, block_index, **kw):
        if block_index == 2:
            seen["files"] = sorted(p.name for p in ckpt.glob("block-*.safetensors"))
            seen["progress"] = read_progress(ckpt)
            slow_scan.set()
        return original(self, model, plans, stats, report, block_index, **kw)

    monkeypatch.setattr(ModelWalker, "_quantize_all", watch)
    assert quantize(stories_dir, out).exit_code == 0
    assert seen == {"files": ["block-0000.safetensors", "block-0001.safetensors"],
                    "progress": None}
    ref = tmp_path / "ref"
    assert quantize(stories_dir, ref, "--no-checkpoint").exit_code == 0
    assert weight_bytes(out) == weight_bytes(ref) and not ckpt.exists()


def test_ctrl_c_before_the_hashes_are_known_leaves_nothing(quantize, stories_dir, slow_scan,
                                                          monkeypatch, tmp_path):
    """Blocks never committed are not a checkpoint: the directory is removed, and the next run
    starts without --resume or --overwrite."""
    out = tmp_path / "o"
    stopped_at_block_2(quantize, stories_dir, out, monkeypatch)
    assert not checkpoint_dir(out).exists() and not out.exists()
    slow_scan.set()
    assert quantize(stories_dir, out).exit_code == 0


def test_resume_on_a_finished_output_is_a_no_op(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    assert quantize(stories_dir, out).exit_code == 0
    before = weight_bytes(out)
    mtime = (out / "config.json").stat().st_mtime_ns
    result = quantize(stories_dir, out, "--resume")
    assert result.exit_code == 0, result.output
    assert weight_bytes(out) == before and (out / "config.json").stat().st_mtime_ns == mtime


def test_weights_changed_in_place_are_refused(quantize, interrupted):
    """Same config, same file size, different values (a fine-tuned model saved over the old)."""
    src, out = interrupted
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    lo, _ = json.loads(data[8 : 8 + n])["model.layers.3.mlp.up_proj.weight"]["data_offsets"]
    at = 8 + n + lo
    (value,) = struct.unpack("<f", data[at : at + 4])
    data[at : at + 4] = struct.pack("<f", value + 0.5)
    f.write_bytes(bytes(data))  # same size, same config
    line = one_line_error(quantize(src, out, "--resume"))
    assert "different model" in line and "--overwrite" in line
    assert read_progress(checkpoint_dir(out)) == 2  # kept


@pytest.mark.parametrize("damage", ["flip a bit", "remove meta", "edit meta", "roll back",
                                    "records", "progress junk"])
def test_damaged_or_edited_checkpoint_is_refused_and_kept(quantize, interrupted, damage):
    src, out = interrupted
    ckpt = checkpoint_dir(out)
    if damage == "flip a bit":
        f = ckpt / "block-0001.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "remove meta":
        (ckpt / "meta.json").unlink()
    elif damage == "edit meta":
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["fingerprint"]["batch_size"] = 8  # the same value, rewritten by hand
        (ckpt / "meta.json").write_text(json.dumps(meta))
    elif damage == "roll back":
        progress = json.loads((ckpt / "progress.json").read_text())
        progress["next_block"] = 1
        (ckpt / "progress.json").write_text(json.dumps(progress))
    elif damage == "records":
        (ckpt / "block-0000.json").write_text("[]")
    else:
        (ckpt / "progress.json").write_text("{ junk")
    files = sorted(p.name for p in ckpt.iterdir())
    line = one_line_error(quantize(src, out, "--resume"))
    assert "damaged or was edited" in line and f"delete {ckpt}" in line
    assert sorted(p.name for p in ckpt.iterdir()) == files  # nothing deleted
    if damage == "progress junk":  # without --resume: refused too, not silently discarded
        line = one_line_error(quantize(src, out))
        assert "unreadable" in line and "--overwrite" in line
        assert sorted(p.name for p in ckpt.iterdir()) == files
