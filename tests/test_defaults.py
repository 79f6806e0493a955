"""The built-in pipelines (quantkit.defaults): what a plain ``quantkit quantize`` and ``--fast``
run, and that the benchmark's ``default``/``fast`` variants build the same recipes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.defaults import DEFAULT, PIPELINES, default_recipe
from quantkit.recipe import Recipe

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _quantize(model_dir, out, text, *extra):
    return runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--quiet",
                               "--calibration", str(text), "--num-samples", "4",
                               "--seq-len", "64", *extra])


def test_every_pipeline_is_a_valid_recipe_and_the_fast_one_has_no_block_methods():
    for name in PIPELINES:
        Recipe.from_dict(PIPELINES[name])
    assert DEFAULT in PIPELINES
    fast, full = default_recipe(fast=True), default_recipe()
    assert not fast.transforms and not fast.optimizers
    assert fast.default == full.default and fast.rules == full.rules


@pytest.mark.parametrize("flags, fast", [((), False), (("--fast",), True)])
def test_plain_quantize_runs_the_default_recipe(stories_dir, tinystories_text, tmp_path, flags,
                                                fast):
    out = tmp_path / "q"
    result = _quantize(stories_dir, out, tinystories_text, "--bits", "3", "--group-size", "32",
                       *flags)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantization_report.json").read_text())
    expected = default_recipe(fast).with_default(bits=3, group_size=32)
    assert report["settings"]["recipe"] == expected.to_dict()
    ran = {m["name"] for m in report["block_methods"]}
    assert ran == {type(o).name for o in expected.optimizers} | \
        {type(t).name for t in expected.transforms}


def test_strategy_flag_takes_that_strategy_at_its_own_defaults(stories_dir, tinystories_text,
                                                               tmp_path):
    out = tmp_path / "q"
    result = _quantize(stories_dir, out, tinystories_text, "--strategy", "gptq")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["settings"]["recipe"] == Recipe().to_dict()
    assert report["block_methods"] == []


def test_fast_leaves_out_a_recipes_block_methods(stories_dir, tinystories_text, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[default]\nstrategy = "gptq"\nbits = 3\ngroup_size = 32\n\n'
                      '[[optimizer]]\nname = "learned_rounding"\nsteps = 2\n')
    out = tmp_path / "q"
    result = _quantize(stories_dir, out, tinystories_text, "--recipe", str(recipe), "--fast")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["settings"]["recipe"] == Recipe.from_dict(
        {"default": {"strategy": "gptq", "bits": 3, "group_size": 32}}).to_dict()
    assert report["block_methods"] == []


def test_quality_benchmark_builds_the_cli_recipes(monkeypatch, tmp_path):
    """benchmarks/quality.py's ``default``/``fast`` variants quantize with the CLI's recipes,
    and it finds the shared folder through QUANTKIT_SHARED."""
    monkeypatch.setenv("QUANTKIT_SHARED", str(tmp_path))
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality_bench", quality)
    spec.loader.exec_module(quality)
    assert quality.SHARED == tmp_path
    assert quality.MODELS["stories260K-pad192"]["path"] == tmp_path / "models" / "stories260K-pad192"
    for variant, fast in (("default", False), ("fast", True)):
        recipe = quality.variant_recipe(variant, 3, 32, lr_steps=7, awq_grid=5)
        assert recipe == default_recipe(fast).with_default(bits=3, group_size=32)
    # Each candidate pipeline is exactly the benchmark variant of its name (at the class
    # defaults of the block methods), so the measured table speaks for it.
    for name, table in PIPELINES.items():
        measured = quality.variant_recipe(name, 3, 32, lr_steps=None, awq_grid=20)
        assert Recipe.from_dict(table).with_default(bits=3, group_size=32) == measured, name
