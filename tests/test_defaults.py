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
    assert not fast.transforms and not fast.optimizers and fast.distill is None
    assert full.distill is not None  # the default ends with end-to-end distillation
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
        {type(t).name for t in expected.transforms} | ({"distill"} if expected.distill else set())
    assert ("distill" in report["phases"]) == (not fast)


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


def test_quality_render_lists_every_run_of_todays_default(monkeypatch, tmp_path):
    """``quality.py --render``'s table of the default: the rows whose recipe is today's default
    (named variants of the same recipe and ``default`` rows that recorded it; each order of the
    learned rounding's sequences listed), their mean, and RTN from the same kind of machine;
    rows of other recipes are left out."""
    spec = importlib.util.spec_from_file_location("quality_render", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality_render", quality)
    spec.loader.exec_module(quality)
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    today = quality.DEFAULT
    cpu = {"machine": "Linux-x86_64", "learned_rounding_steps": None, "awq_grid": 20}

    def write(name, rows, settings=cpu):
        (tmp_path / name).write_text(json.dumps({"settings": settings, "results": rows}))

    flt = {"variant": "float", "bits": 16, "perplexity": 10.0, "kl": 0.0}
    write("quality_smollm2-135m_a.json", [flt, {"variant": "rtn", "bits": 4, "group_size": 64,
                                                "perplexity": 20.0, "kl": 1.0}])
    write("quality_smollm2-135m_b.json", [flt, {"variant": today, "bits": 4, "group_size": 64,
                                                "perplexity": 13.0, "kl": 0.2}])
    write("quality_smollm2-135m_c.json", [flt, {"variant": f"{today}_s1", "bits": 4,
                                                "group_size": 64, "perplexity": 15.0, "kl": 0.4}])
    recorded = quality.default_recipe().with_default(bits=4, group_size=64).to_dict()
    old = quality.default_recipe(fast=True).with_default(bits=4, group_size=64).to_dict()
    write("quality_smollm2-135m_d.json", [
        flt, {"variant": "default", "bits": 4, "group_size": 64, "perplexity": 14.0, "kl": 0.3,
              "recipe": recorded},
        {"variant": "default", "bits": 3, "group_size": 64, "perplexity": 99.0, "kl": 3.0,
         "recipe": old},  # another recipe: not today's default
        {"variant": "gptq_best", "bits": 4, "group_size": 64, "perplexity": 11.0, "kl": 0.1}])
    table = quality._current_default()
    rows = [line for line in table.splitlines() if line.startswith("| smollm2-135m")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["smollm2-135m", "4", "64", "CPU"]
    assert cells[4] == "13.000 (0.2000), 14.000 (0.3000), 15.000 (0.4000)"
    assert cells[5] == "**14.000** (0.3000)" and cells[6] == "1.40×"
    assert cells[7] == "20.000" and cells[8] == "60.0%"  # (20 - 14) / (20 - 10)
