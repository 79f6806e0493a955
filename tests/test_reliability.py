"""The bad-input matrix: every way a run can be handed bad input, a full disk or a Ctrl-C, with
the one-line error (exit 1) or the documented, reported fallback each one gets.

CLI behaviour is tested through typer's CliRunner; numerical fallbacks at the API level."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import weight_bytes
from typer.testing import CliRunner

from quantkit import (
    FactorizationError,
    GPTQQuantizer,
    HessianStats,
    ModelWalker,
    QuantSpec,
    Recipe,
    round_to_nearest,
)
from quantkit.checkpoint import DirectoryCheckpoint, checkpoint_dir
from quantkit.cli import app
from quantkit.errors import CheckpointError, ModelLoadError

runner = CliRunner()

#: Plumbing tests: the pipeline without its block methods (--fast); quicker, same paths.
FAST = ["--num-samples", "8", "--seq-len", "64", "--group-size", "32", "-q", "--fast"]


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error:")
    return " ".join(lines[0].split())


def no_leftovers(parent: Path, name: str) -> bool:
    """Nothing of the output (not even a hidden partial directory) is left in ``parent``."""
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def quantize(tinystories_text):
    def run(model_dir, out, *extra):
        return runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--calibration",
                                   str(tinystories_text), *FAST, *map(str, extra)])
    return run


@pytest.fixture
def model_copy(stories_dir, tmp_path):
    """A writable copy of stories260K to break."""
    dst = tmp_path / "model"
    shutil.copytree(stories_dir, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


# -- the model directory ------------------------------------------------------------------------

def test_missing_model_dir(quantize, tmp_path):
    line = one_line_error(quantize(tmp_path / "nope", tmp_path / "o"))
    assert "does not exist" in line
    assert no_leftovers(tmp_path, "o")


def test_model_dir_without_config(quantize, model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    assert "has no config.json" in one_line_error(quantize(model_copy, tmp_path / "o"))


def test_config_not_json(quantize, model_copy, tmp_path):
    (model_copy / "config.json").write_text("{ not json")
    assert "is not valid JSON" in one_line_error(quantize(model_copy, tmp_path / "o"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(quantize, model_copy, tmp_path, damage):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(range(256)) * 8)
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "truncated or corrupt" in line
    assert no_leftovers(tmp_path, "o")


def test_unknown_model_type(quantize, model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "nosuchmodel"
    (model_copy / "config.json").write_text(json.dumps(config))
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "model_type 'nosuchmodel' is not supported" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights(quantize, model_copy, tmp_path, bad):
    f = model_copy / "model.safetensors"
    weights = mx.load(str(f))
    w = np.array(weights["model.layers.2.mlp.up_proj.weight"])
    w[3, 5] = bad
    weights["model.layers.2.mlp.up_proj.weight"] = mx.array(w)
    mx.save_safetensors(str(f), weights)
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "model.layers.2.mlp.up_proj.weight" in line and "NaN/Inf" in line


def _bad_scan(delay: float = 0.0):
    """A weight scan (see quantkit.api) that finds a NaN after ``delay`` seconds."""
    def scan(model_dir, digest=False):
        time.sleep(delay)
        raise ModelLoadError("weight model.layers.3.mlp.up_proj.weight in M has 1 NaN/Inf "
                             "values; the checkpoint is corrupt")
    return scan


def test_the_scan_s_verdict_replaces_an_error_bad_weights_caused(quantize, stories_dir,
                                                                  tmp_path, monkeypatch):
    """The scan runs beside the blocks' work: when the run fails first (here: at block 0, as NaN
    weights fail a factorization) and the scan then finds bad weights, the user is told about the
    weights, not about the symptom."""
    monkeypatch.setattr("quantkit.api.scan_weights", _bad_scan(delay=1.0))
    original = ModelWalker._quantize_all

    def failing(self, model, plans, stats, report, block_index, **kw):
        if block_index == 0:
            raise FactorizationError("Hessian has NaN/Inf entries")
        return original(self, model, plans, stats, report, block_index, **kw)

    monkeypatch.setattr(ModelWalker, "_quantize_all", failing)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"))
    assert "model.layers.3.mlp.up_proj.weight" in line and "NaN/Inf" in line
    assert no_leftovers(tmp_path, "o")


def test_a_run_on_bad_weights_stops_at_the_scan_s_verdict(quantize, stories_dir, tmp_path,
                                                          monkeypatch):
    """Once the scan has found bad weights the run stops at its next progress event: no block
    is solved after that (here the verdict is in before the first block)."""
    monkeypatch.setattr("quantkit.api.scan_weights", _bad_scan())
    import quantkit.api as api

    original_load = api.load_calibration

    def after_the_scan(*args, **kwargs):
        deadline = time.monotonic() + 10
        while any(t.name == "quantkit-scan" for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return original_load(*args, **kwargs)

    monkeypatch.setattr(api, "load_calibration", after_the_scan)
    solved = []
    original = ModelWalker._quantize_all

    def counting(self, *args, **kw):
        solved.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(ModelWalker, "_quantize_all", counting)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"))
    assert "NaN/Inf" in line and not solved
    assert no_leftovers(tmp_path, "o")


# -- recipes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("toml, expected", [
    ('[default]\nbitz = 4\n', "unknown key 'bitz'"),
    ('[[rules]]\nmatch = "*.q_proj"\nbits = 7\n', "key 'bits'"),
    ('[[rules]]\nmatch = "*.q_proj"\ngroup_size = 48\n', "key 'group_size'"),
    ('[[rules]]\nmatch = "re:model.(layers"\n', "invalid regex"),
    ('[[rules]]\nmatch = "*"\nstrategy = "magic"\n', "unknown strategy 'magic'"),
    ('[[rules]]\nmatch = "*"\nlinalg = "cuda-magic"\n', "bad option value"),
    ('[default]\nbits = "four"\n', "must be an integer"),
    ('[default\nbits = 4\n', "not valid TOML"),
    ('[oops]\n', "unknown top-level key 'oops'"),
])
def test_bad_recipe(quantize, stories_dir, tmp_path, toml, expected):
    recipe = tmp_path / "r.toml"
    recipe.write_text(toml)
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--recipe", recipe))
    assert expected in line
    assert no_leftovers(tmp_path, "o")


def test_recipe_path_is_a_directory(quantize, stories_dir, tmp_path):
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--recipe", tmp_path))
    assert "recipe file" in line and "is a directory, not a file" in line


def test_group_size_dividing_some_layers_is_reported(quantize, stories_dir, tmp_path):
    """stories260K's MLP width 172: no MLX group size divides it, so down_proj stays in full
    precision and the config and report say so (the documented fallback, exit 0)."""
    out = tmp_path / "o"
    result = quantize(stories_dir, out, "--strategy", "rtn")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] is False
    report = json.loads((out / "quantization_report.json").read_text())
    skipped = [r for r in report["layers"] if r["status"] == "skipped"]
    assert len(skipped) == 5 and all("not divisible" in r["reason"] for r in skipped)


def test_group_size_dividing_no_layer(quantize, tmp_path, stories_dir):
    """A model none of whose widths any allowed group size divides: a clear error."""
    model_dir = _tiny_llama(tmp_path / "tiny", stories_dir, hidden=48, intermediate=40)
    line = one_line_error(quantize(model_dir, tmp_path / "o"))
    assert "no layer of this model can be quantized" in line and "not divisible" in line


def _tiny_llama(path: Path, tokenizer_dir: Path, hidden: int, intermediate: int) -> Path:
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": 2,
              "intermediate_size": intermediate, "num_attention_heads": 4,
              "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 512,
              "tie_word_embeddings": True}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


# -- calibration --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", "is empty"),
    ("   \n\n  ", "is empty"),
    ("Once upon a time.", "fewer than one sequence"),
])
def test_bad_calibration_text(stories_dir, tmp_path, text, expected):
    calib = tmp_path / "c.txt"
    calib.write_text(text)
    result = runner.invoke(app, ["quantize", str(stories_dir), "-o", str(tmp_path / "o"),
                                 *FAST, "--calibration", str(calib)])
    assert expected in one_line_error(result)
    assert no_leftovers(tmp_path, "o")


def test_calibration_not_utf8_or_missing(stories_dir, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_bytes(b"\xff\xfe\x00bad" * 100)
    args = ["quantize", str(stories_dir), "-o", str(tmp_path / "o"), *FAST, "--calibration"]
    assert "not UTF-8" in one_line_error(runner.invoke(app, [*args, str(calib)]))
    assert "does not exist" in one_line_error(runner.invoke(app, [*args, str(tmp_path / "no.txt")]))


# -- the output path ----------------------------------------------------------------------------

def _fake_quantkit_output(out: Path, marker: str = "old") -> None:
    """A directory that passes the ownership test: a run report, a config.json with
    'quantization' and weights (the only kind --overwrite replaces)."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization": {"bits": 4}, "marker": marker}))
    (out / "quantization_report.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")


def test_output_exists_needs_overwrite(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    _fake_quantkit_output(out)
    before = (out / "config.json").read_text()
    assert "already exists; pass --overwrite" in one_line_error(quantize(stories_dir, out))
    assert (out / "config.json").read_text() == before
    result = quantize(stories_dir, out, "--overwrite", "--strategy", "rtn")
    assert result.exit_code == 0, result.output
    assert "marker" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".o.*"))  # no partial, old or checkpoint directory left
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700


@pytest.mark.parametrize("kind", ["project", "model", "config-only", "no-quantization", "no-weights"])
def test_overwrite_only_replaces_quantkit_output(quantize, stories_dir, tmp_path, kind):
    """--overwrite replaces only a directory quantkit wrote; a project folder or another
    (full-precision) model is refused, with or without --overwrite, and the refusal says why
    and never suggests --overwrite."""
    out = tmp_path / "dir"
    if kind == "project":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        why = "no quantization_report.json"
    elif kind == "model":  # another full-precision model: config.json and weights
        shutil.copytree(stories_dir, out)
        why = "no quantization_report.json"
    elif kind == "config-only":
        out.mkdir()
        (out / "config.json").write_text("{}")
        why = "no quantization_report.json"
    else:
        _fake_quantkit_output(out)
        if kind == "no-quantization":
            (out / "config.json").write_text("{}")
            why = "no 'quantization' entry"
        else:
            (out / "model.safetensors").unlink()
            why = "no *.safetensors"
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.is_file())
    for extra in ([], ["--overwrite"]):
        line = one_line_error(quantize(stories_dir, out, *extra))
        assert "was not written by quantkit" in line and why in line, line
        assert "pass --overwrite" not in line
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.is_file()) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_is_a_file(quantize, stories_dir, tmp_path, overwrite):
    (tmp_path / "file").write_text("x")
    line = one_line_error(quantize(stories_dir, tmp_path / "file", *overwrite))
    assert "is not a directory" in line and "--overwrite" not in line
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_replaces_quantkits_own_output(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    assert quantize(stories_dir, out, "--strategy", "rtn").exit_code == 0
    first = weight_bytes(out)
    result = quantize(stories_dir, out, "--overwrite")  # gptq this time: other bytes
    assert result.exit_code == 0, result.output
    assert weight_bytes(out) != first
    empty = tmp_path / "empty"
    empty.mkdir()
    assert quantize(stories_dir, empty, "--overwrite", "--strategy", "rtn").exit_code == 0


def test_output_is_the_model_dir(quantize, model_copy):
    line = one_line_error(quantize(model_copy, model_copy, "--overwrite"))
    assert "would replace the model directory" in line
    line = one_line_error(quantize(model_copy, model_copy.parent, "--overwrite"))
    assert "would replace the model directory" in line


def test_output_not_writable(quantize, stories_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(quantize(stories_dir, tmp_path / "afile" / "o"))
    assert "cannot write to" in line and "choose a writable output path" in line


def test_disk_full_during_save(quantize, stories_dir, tmp_path, monkeypatch):
    """The writer runs out of space half-way: nothing appears, the temp dir is removed, and an
    existing output survives untouched."""
    import quantkit.pipeline.shards

    def full_disk(directory, *args, **kw):
        (Path(directory) / "model-00001-of-00006.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(quantkit.pipeline.shards, "assemble", full_disk)
        line = one_line_error(quantize(stories_dir, out, "--strategy", "rtn"))
        assert "no space left on device" in line and "rerun with --resume" in line
        assert not out.exists() and not list(tmp_path.glob(".o.partial-*"))
        assert checkpoint_dir(out).is_dir()  # every block is done: the rerun only saves

        _fake_quantkit_output(out)
        old = (out / "config.json").read_text()
        line = one_line_error(quantize(stories_dir, out, "--strategy", "rtn", "--overwrite", "--resume"))
        assert "no space left on device" in line
        assert (out / "config.json").read_text() == old
        assert not list(tmp_path.glob(".o.partial-*")) and not list(tmp_path.glob(".o.old-*"))

    assert quantize(stories_dir, out, "--strategy", "rtn", "--overwrite", "--resume").exit_code == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert not list(tmp_path.glob(".o.*"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_in_mlx_writer(quantize, stories_dir, tmp_path, monkeypatch):
    """The real writers on a full disk: the last output shard (and later a checkpoint file) is
    a link to /dev/full, where every write fails with ENOSPC; MLX reports it as RuntimeError."""
    import quantkit.pipeline.shards as shards

    real_assemble = shards.assemble

    def assemble_into_full_disk(directory, blocks, *args, **kw):
        n = len(blocks) + 1
        (Path(directory) / shards.shard_name(n, n)).symlink_to("/dev/full")
        return real_assemble(directory, blocks, *args, **kw)

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(shards, "assemble", assemble_into_full_disk)
        line = one_line_error(quantize(stories_dir, out, "--strategy", "rtn", "--no-checkpoint"))
    assert "Unable to write" in line and "is the disk full?" in line
    assert no_leftovers(tmp_path, "o")

    ckpt = checkpoint_dir(out)
    ckpt.mkdir()
    (ckpt / ".tmp-block-0000.safetensors").symlink_to("/dev/full")
    line = one_line_error(quantize(stories_dir, out, "--strategy", "rtn", "--resume"))
    assert "writing the checkpoint" in line and "after block 0" in line and "is the disk full?" in line
    assert not out.exists()


def test_stale_partials_of_dead_runs_are_removed(quantize, stories_dir, tmp_path):
    stale = tmp_path / ".o.partial-999999999-abcd"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = quantize(stories_dir, tmp_path / "o", "--strategy", "rtn")
    assert result.exit_code == 0, result.output
    assert not stale.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_partials_of_unreaped_killed_processes_are_removed(quantize, stories_dir, tmp_path):
    """A rank killed with its launcher is re-parented; where the new parent never reaps it (a
    container's PID 1) its PID stays taken by a zombie, which will never finish its files."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        stale = tmp_path / f".o.partial-{child.pid}-abcd"
        stale.mkdir()
        (stale / "block-0000.safetensors").write_bytes(b"half")
        result = quantize(stories_dir, tmp_path / "o", "--strategy", "rtn")
        assert result.exit_code == 0, result.output
        assert not stale.exists()
    finally:
        child.wait()


# -- interruption, checkpoints, internal errors ----------------------------------------------------

def _interrupt_at_block(monkeypatch, block: int):
    """Ctrl-C while block ``block`` is being quantized."""
    original = ModelWalker._quantize_all

    def interrupted(self, model, plans, stats, report, block_index, **kw):
        if block_index == block:
            raise KeyboardInterrupt
        return original(self, model, plans, stats, report, block_index, **kw)

    monkeypatch.setattr(ModelWalker, "_quantize_all", interrupted)


def test_ctrl_c_is_clean_and_resumable(quantize, stories_dir, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert quantize(stories_dir, ref).exit_code == 0
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _interrupt_at_block(m, 3)
        line = one_line_error(quantize(stories_dir, out), code=130)
    assert "3 finished blocks are checkpointed" in line and "--resume" in line
    assert not out.exists() and checkpoint_dir(out).is_dir()

    line = one_line_error(quantize(stories_dir, out))
    assert "left a checkpoint" in line and "--resume" in line
    line = one_line_error(quantize(stories_dir, out, "--resume", "--seed", "1"))
    assert "different calibration data" in line

    result = quantize(stories_dir, out, "--resume")
    assert result.exit_code == 0, result.output
    assert weight_bytes(out) == weight_bytes(ref)
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    report = json.loads((out / "quantization_report.json").read_text())
    assert [r["path"] for r in report["layers"]] == \
        [r["path"] for r in json.loads((ref / "quantization_report.json").read_text())["layers"]]
    assert not checkpoint_dir(out).exists()


def test_sigterm_is_a_clean_stop(quantize, stories_dir, tmp_path, monkeypatch):
    import signal

    original = ModelWalker._quantize_all

    def terminated(self, model, plans, stats, report, block_index, **kw):
        if block_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, plans, stats, report, block_index, **kw)

    monkeypatch.setattr(ModelWalker, "_quantize_all", terminated)
    before = signal.getsignal(signal.SIGTERM)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"), code=143)
    assert "interrupted (SIGTERM); 2 finished blocks are checkpointed" in line
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_before_any_block(quantize, stories_dir, tmp_path, monkeypatch):
    _interrupt_at_block(monkeypatch, 0)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"), code=130)
    assert "nothing was written" in line


def test_overwrite_discards_a_checkpoint(quantize, stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _interrupt_at_block(m, 2)
        one_line_error(quantize(stories_dir, out), code=130)
    result = quantize(stories_dir, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not checkpoint_dir(out).exists()


def test_damaged_checkpoint(quantize, stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _interrupt_at_block(m, 2)
        one_line_error(quantize(stories_dir, out), code=130)
    (checkpoint_dir(out) / "block-0001.safetensors").write_bytes(b"junk")
    assert "is damaged" in one_line_error(quantize(stories_dir, out, "--resume"))


def test_checkpoint_in_use_by_another_run(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    with DirectoryCheckpoint(checkpoint_dir(out), {}):
        assert "another quantkit run" in one_line_error(quantize(stories_dir, out, "--resume"))
        with pytest.raises(CheckpointError):
            DirectoryCheckpoint(checkpoint_dir(out), {}).__enter__()


def test_internal_error_is_one_line_unless_debug(quantize, stories_dir, tmp_path, monkeypatch):
    def bug(self, *a, **kw):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(ModelWalker, "_quantize_all", bug)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"), code=3)
    assert "internal error (ZeroDivisionError: boom)" in line and "--debug" in line
    assert not checkpoint_dir(tmp_path / "o").exists()  # it held no finished block
    result = quantize(stories_dir, tmp_path / "o", "--debug")
    assert isinstance(result.exception, ZeroDivisionError)


def test_debug_reraises_input_errors(quantize, tmp_path):
    from quantkit import ModelLoadError

    result = quantize(tmp_path / "nope", tmp_path / "o", "--debug")
    assert isinstance(result.exception, ModelLoadError)


# -- numerics: reported fallbacks (API level) ---------------------------------------------------------

def _layer_plan(weight: mx.array, recipe: Recipe):
    """A plan for a single nn.Linear with ``weight``, as the walker makes it."""
    import mlx.nn as nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.proj.weight = weight

    walker = ModelWalker(recipe=recipe)
    return walker, walker.plan(One())["proj"]


def _rng_weight(out=16, inp=64, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32))


def test_non_pd_hessian_falls_back_to_rtn_and_reports_it():
    w = _rng_weight()
    n = w.shape[1]
    h = mx.array((1000.0 * np.ones((n, n)) - 999.0 * np.eye(n)).astype(np.float32))  # eig -999
    spec = QuantSpec(4, 32)
    with pytest.raises(FactorizationError):
        GPTQQuantizer().quantize(w, spec, HessianStats(h, 100))
    walker, plan = _layer_plan(w, Recipe.uniform(group_size=32))
    module, record = walker.quantize_layer(plan, HessianStats(h, 100))
    assert record.status == "fallback" and record.strategy == "rtn"
    assert "Cholesky" in record.reason and "after 5 attempts" in record.reason
    rtn = round_to_nearest(w, spec, mx.float32)
    assert mx.array_equal(module.scales, rtn.scales)


def test_singular_hessian_is_rescued_by_damping():
    """Rank-deficient (singular but PSD) Hessian: damping makes it factorizable, no fallback."""
    w = _rng_weight()
    x = np.random.default_rng(1).standard_normal((8, w.shape[1]))  # rank 8 of 64
    h = mx.array((x.T @ x / 8).astype(np.float32))
    walker, plan = _layer_plan(w, Recipe.uniform(group_size=32))
    module, record = walker.quantize_layer(plan, HessianStats(h, 8))
    assert record.status == "quantized" and record.strategy == "gptq"
    assert record.hessian_error <= record.rtn_hessian_error


def test_nan_hessian_falls_back_and_reports_it():
    w = _rng_weight()
    h = np.eye(w.shape[1], dtype=np.float32)
    h[2, 3] = np.nan
    walker, plan = _layer_plan(w, Recipe.uniform(group_size=32))
    module, record = walker.quantize_layer(plan, HessianStats(mx.array(h), 10))
    assert record.status == "fallback" and "NaN/Inf" in record.reason
    assert bool(mx.all(mx.isfinite(module.scales)).item())


def test_all_zero_input_columns():
    """Dead inputs (zero Hessian rows/columns) neither break GPTQ nor receive error; an all-zero
    Hessian (a layer that only ever saw zeros) gives exactly RTN."""
    w = _rng_weight()
    x = np.random.default_rng(2).standard_normal((256, w.shape[1])).astype(np.float32)
    x[:, ::3] = 0.0
    h = mx.array(x.T @ x / 256)
    spec = QuantSpec(4, 32)
    out = GPTQQuantizer().quantize(w, spec, HessianStats(h, 256))
    assert out.info["dead_inputs"] == len(range(0, w.shape[1], 3))
    assert bool(mx.all(mx.isfinite(out.dequantized)).item())
    walker, plan = _layer_plan(w, Recipe.uniform(group_size=32))
    _, record = walker.quantize_layer(plan, HessianStats(h, 256))
    assert record.status == "quantized" and record.hessian_error <= record.rtn_hessian_error

    zero = GPTQQuantizer().quantize(w, spec, HessianStats(mx.zeros_like(h), 256))
    rtn = round_to_nearest(w, spec, mx.float32)
    assert mx.array_equal(zero.codes, rtn.codes)


def test_dead_columns_of_a_real_model(tmp_path, tinystories_text):
    """stories260K-pad192: its down projections have 20 all-zero input columns."""
    from conftest import shared_path

    from quantkit import quantize_directory

    model_dir = shared_path("models", "stories260K-pad192")
    recipe = Recipe.from_dict({"default": {"strategy": "rtn", "group_size": 32},
                               "rules": [{"match": "*.down_proj", "strategy": "gptq"}]})
    result = quantize_directory(model_dir, tmp_path / "o", recipe, calibration=tinystories_text,
                                num_samples=8, seq_len=64, checkpoint=False)
    downs = [r for r in result.report.layers if r.path.endswith("down_proj")]
    assert downs and all(r.status == "quantized" and r.strategy == "gptq" for r in downs)
    assert all(r.hessian_error <= r.rtn_hessian_error * (1 + 1e-6) for r in downs)


# -- second pass: silent no-ops, silent damage, and bad input that used to be an internal error ----

def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args), "--num-samples", "2", "--seq-len", "64"])


@pytest.mark.parametrize("rules, expected", [
    ([{"match": "*.q_prj", "bits": 8}], "rule 1 ('*.q_prj') matches no layer"),  # a typo
    ([{"match": "*.q_proj", "bits": 8}, {"match": "model.layers.1.self_attn.q_proj", "bits": 3}],
     "rule 2 ('model.layers.1.self_attn.q_proj') matches 1 layer(s), all taken by earlier rules (rule 1"),
    ([{"match": "re:.*\\.lm_head", "strategy": "rtn"}], "matches no layer"),  # tied head
])
def test_recipe_rule_taking_no_layer_is_refused(quantize, stories_dir, tmp_path, rules, expected):
    """A rule that takes no layer would silently lose the precision asked for: refused before
    any calibration, naming the rule (recipe check lists the same)."""
    from quantkit.recipe import Recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text(Recipe.from_dict({"rules": rules}).to_toml())
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--recipe", recipe))
    assert expected in line and "recipe check" in line
    assert no_leftovers(tmp_path, "o")


def test_float16_overflow_is_refused_naming_the_layer(quantize, model_copy, tmp_path):
    """Weights beyond float16's range (±65504) in --dtype float16: the packed scales would be
    infinite. Refused, naming the layer and --dtype bfloat16; nothing written."""
    weights = mx.load(str(model_copy / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    weights[name] = weights[name] * 1e6
    mx.save_safetensors(str(model_copy / "model.safetensors"), weights)
    line = one_line_error(quantize(model_copy, tmp_path / "o", "--dtype", "float16"))
    assert "layer model.layers.1.self_attn" in line and "--dtype bfloat16" in line
    assert "Inf/NaN" in line
    assert not (tmp_path / "o").exists()
    result = quantize(model_copy, tmp_path / "o", "--dtype", "bfloat16", "--strategy", "rtn",
                      "--overwrite")  # discards the checkpoint of the refused run
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-2"])
def test_target_bpw_not_a_positive_number(quantize, stories_dir, tmp_path, value):
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--target-bpw", value), 2)
    assert "--target-bpw" in line and "positive number" in line


def test_infeasible_target_bpw_names_the_smallest_reachable(quantize, stories_dir, tmp_path):
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--target-bpw", "1.0"))
    assert "cannot be met: the smallest reachable is" in line and "bits per weight" in line
    smallest = float(line.split("smallest reachable is ")[1].split()[0])
    assert 1.0 < smallest < 16 and "-" not in line.split("reachable is")[1]
    assert no_leftovers(tmp_path, "o")


def test_negative_seed_or_timeout(quantize, stories_dir, tmp_path):
    assert "--seed -1" in one_line_error(quantize(stories_dir, tmp_path / "o", "--seed", "-1"), 2)
    assert "--seed -1" in one_line_error(_eval(stories_dir, "--seed", "-1"), 2)
    for value in ("nan", "0", "-5"):
        line = one_line_error(quantize(stories_dir, tmp_path / "o", "--timeout", value), 2)
        assert "--timeout" in line and "positive number of seconds" in line
    assert no_leftovers(tmp_path, "o")


@pytest.mark.parametrize("kind", ["directory", "/dev/null", "fifo"])
def test_calibration_path_that_is_not_a_file(quantize, stories_dir, tmp_path, kind):
    """Not "does not exist": a directory, a device or a named pipe (reading a pipe would block)
    is named for what it is — for quantize --calibration, eval --text and --recipe."""
    if kind == "directory":
        path, what = tmp_path / "texts", "is a directory"
        path.mkdir()
    elif kind == "/dev/null":
        path, what = Path("/dev/null"), "is a character device"
        if not path.exists():
            pytest.skip("no /dev/null")
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes here")
        path, what = tmp_path / "pipe", "is a named pipe"
        os.mkfifo(path)
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--calibration", path))
    assert f"calibration file {path} {what}, not a file" in line
    assert f"{what}, not a file" in one_line_error(_eval(stories_dir, "--text", path))
    assert f"recipe file {path} {what}" in one_line_error(
        quantize(stories_dir, tmp_path / "o", "--recipe", path))
    assert no_leftovers(tmp_path, "o")


def test_model_config_problems_are_blamed_on_the_config(quantize, model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    del config["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(config))
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "lacks 'hidden_size'" in line and "corrupt" not in line
    (model_copy / "config.json").write_text("[1, 2]")
    assert "holds a JSON list" in one_line_error(quantize(model_copy, tmp_path / "o"))
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").mkdir()  # unreadable as a file (root ignores permissions)
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "model config" in line and "is a directory" in line
    line = one_line_error(quantize(model_copy / "tokenizer.json", tmp_path / "o"))
    assert "is a file, not a directory" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions do not apply to root (the directory cases cover it)")
def test_unreadable_files_are_permission_errors(quantize, model_copy, tmp_path):
    (model_copy / "model.safetensors").chmod(0)
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "permission denied" in line and "corrupt" not in line
    (model_copy / "model.safetensors").chmod(0o644)
    (model_copy / "config.json").chmod(0)
    assert "permission denied" in one_line_error(quantize(model_copy, tmp_path / "o"))


def test_weight_file_that_is_a_directory(quantize, model_copy, tmp_path):
    (model_copy / "extra.safetensors").mkdir()
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "weight file" in line and "is a directory" in line and "corrupt" not in line


def test_mlx_lm_messages_are_not_cut(quantize, model_copy, tmp_path):
    """mlx-lm's "Received 1 parameters not in model: " puts the names on the next line."""
    weights = mx.load(str(model_copy / "model.safetensors"))
    weights["model.layers.0.extra.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(model_copy / "model.safetensors"), weights)
    line = one_line_error(quantize(model_copy, tmp_path / "o"))
    assert "not in model" in line and "model.layers.0.extra.weight" in line


def test_recipe_option_error_has_no_internal_repr(quantize, stories_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[default]\nstrategy = "gptq"\nscale_search = "fast"\n')
    line = one_line_error(quantize(stories_dir, tmp_path / "o", "--recipe", recipe))
    assert "'scale_search' must be in" in line and "Attribute(" not in line


def test_eval_perplexity_overflow(model_copy, tmp_path):
    """A model whose loss is beyond exp's range (here: final norm scaled by 1e4) is reported as
    broken, not as an internal OverflowError."""
    weights = mx.load(str(model_copy / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e4
    mx.save_safetensors(str(model_copy / "model.safetensors"), weights)
    line = one_line_error(_eval(model_copy))
    assert "perplexity is too large to represent" in line and "nats per token" in line


def test_report_png_path_problems(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    assert quantize(stories_dir, out, "--strategy", "rtn").exit_code == 0
    plots = tmp_path / "plots"
    plots.mkdir()
    line = one_line_error(runner.invoke(app, ["report", str(out), "--png", str(plots)]))
    assert "is a directory" in line and "report.png" in line
    (tmp_path / "afile").write_text("x")
    line = one_line_error(runner.invoke(app, ["report", str(out), "--png", str(tmp_path / "afile" / "p.png")]))
    assert "is a file, not a directory" in line
    line = one_line_error(runner.invoke(app, ["report", str(out), "--png", str(tmp_path / "p.xyz")]))
    assert "cannot write" in line and "xyz" in line


def test_failed_run_removes_the_parents_it_created(quantize, stories_dir, tmp_path):
    out = tmp_path / "a" / "b" / "o"
    one_line_error(quantize(stories_dir, out, "--calibration", tmp_path / "missing.txt"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()  # existing parents stay
    one_line_error(quantize(stories_dir, out, "--calibration", tmp_path / "missing.txt"))
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()


def test_inspect_and_report_bad_directories(quantize, stories_dir, tmp_path):
    """Every command that reads a model or a report names the problem, never a traceback."""
    out = tmp_path / "o"
    assert quantize(stories_dir, out, "--strategy", "rtn").exit_code == 0
    inspect = lambda d: runner.invoke(app, ["inspect", str(d)])  # noqa: E731
    assert "is not quantized" in one_line_error(inspect(stories_dir))
    assert "does not exist" in one_line_error(inspect(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    assert "truncated or corrupt" in one_line_error(inspect(broken))
    (broken / "config.json").write_text('"text"')
    assert "holds a JSON str" in one_line_error(inspect(broken))
    report = broken / "quantization_report.json"
    report.unlink()
    report.mkdir()
    line = one_line_error(runner.invoke(app, ["report", str(broken)]))
    assert "run report" in line and "is a directory" in line
    report.rmdir()
    report.write_bytes(b"\xff\xfe not utf-8")
    assert "not a quantkit run report" in one_line_error(runner.invoke(app, ["report", str(broken)]))


def test_library_refuses_unused_rules_before_any_calibration(stories_dir, stories_tokens):
    """The validation pass is the library's, not only the CLI's: quantize_model refuses a rule
    that takes no layer before any block is calibrated (no progress event but none)."""
    from quantkit import RecipeError, load_model, quantize_model

    model, _, _ = load_model(stories_dir)
    events = []
    recipe = Recipe.from_dict({"rules": [{"match": "*.v_prj", "bits": 8}]})
    with pytest.raises(RecipeError, match=r"rule 1 \('\*\.v_prj'\) matches no layer"):
        quantize_model(model, stories_tokens[0][:8, :64], recipe,
                       progress=lambda event, info: events.append(event))
    assert events == []


def test_validation_helpers():
    from quantkit.errors import describe
    from quantkit.validate import launcher_environment

    assert launcher_environment({}) is None
    assert launcher_environment({"MLX_RANK": "0"}) == "MLX_RANK"
    assert launcher_environment({"OMPI_COMM_WORLD_SIZE": "1"}) is None  # mpirun -np 1
    assert launcher_environment({"PMI_SIZE": "4"}) == "PMI_SIZE"
    assert describe(ValueError("Received 1 parameters not in model: \nmodel.x.weight.")) == \
        "Received 1 parameters not in model: model.x.weight."
    assert describe(TypeError("'bits' must be int", object(), int)) == "'bits' must be int"
    assert describe(RuntimeError("")) == "RuntimeError"
    assert len(describe(ValueError("x" * 1000), limit=50)) == 50


def test_not_quantkit_output_reasons(tmp_path):
    from quantkit.validate import not_quantkit_output

    assert not_quantkit_output(tmp_path) is None  # empty
    (tmp_path / "notes.txt").write_text("x")
    assert "quantization_report.json" in not_quantkit_output(tmp_path)
    _fake_quantkit_output(tmp_path / "q")
    assert not_quantkit_output(tmp_path / "q") is None
