"""The bad-input matrix: every way a run can be handed bad input, a full disk or a Ctrl-C, with
the one-line error (exit 1) or the documented, reported fallback each one gets.

CLI behaviour is tested through typer's CliRunner; numerical fallbacks at the API level."""

from __future__ import annotations

import errno
import json
import os
import shutil
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
from quantkit.errors import CheckpointError

runner = CliRunner()

FAST = ["--num-samples", "8", "--seq-len", "64", "--group-size", "32", "-q"]


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
    assert "cannot read recipe file" in line


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

def test_output_exists_needs_overwrite(quantize, stories_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert "already exists; pass --overwrite" in one_line_error(quantize(stories_dir, out))
    assert (out / "config.json").read_text() == "{}"
    result = quantize(stories_dir, out, "--overwrite", "--strategy", "rtn")
    assert result.exit_code == 0, result.output
    assert "quantization" in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".o.*"))  # no partial, old or checkpoint directory left
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700


def test_overwrite_refuses_non_model_dirs(quantize, stories_dir, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = one_line_error(quantize(stories_dir, out, "--overwrite"))
    assert "not a model directory" in line
    assert (out / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in one_line_error(quantize(stories_dir, tmp_path / "file", "--overwrite"))


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

        out.mkdir()
        (out / "config.json").write_text('{"old": true}')
        line = one_line_error(quantize(stories_dir, out, "--strategy", "rtn", "--overwrite", "--resume"))
        assert "no space left on device" in line
        assert (out / "config.json").read_text() == '{"old": true}'
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


# -- interruption, checkpoints, internal errors ----------------------------------------------------

def _interrupt_at_block(monkeypatch, block: int):
    """Ctrl-C while block ``block`` is being quantized."""
    original = ModelWalker._quantize_all

    def interrupted(self, model, plans, stats, report, block_index):
        if block_index == block:
            raise KeyboardInterrupt
        return original(self, model, plans, stats, report, block_index)

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

    def terminated(self, model, plans, stats, report, block_index):
        if block_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, plans, stats, report, block_index)

    monkeypatch.setattr(ModelWalker, "_quantize_all", terminated)
    before = signal.getsignal(signal.SIGTERM)
    line = one_line_error(quantize(stories_dir, tmp_path / "o"), code=130)
    assert "2 finished blocks are checkpointed" in line
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
