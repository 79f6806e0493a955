"""eval, report, recipe check (and inspect / quantize errors) through CliRunner on stories260K."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli import app

runner = CliRunner()

RECIPE = """
[default]
strategy = "gptq"
bits = 4
group_size = 32

[[rules]]
match = "model.layers.0.*"
strategy = "rtn"
bits = 8

[[rules]]
match = "*.q_proj"
bits = 3

[[rules]]
match = "model.layers.0.self_attn.q_proj"   # shadowed by rule 1
strategy = "skip"

[[rules]]
match = "re:.*\\\\.lm_head"                   # stories260K ties its head: matches nothing
strategy = "rtn"
"""


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "mixed.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def quantized(stories_dir, tinystories_text, tmp_path_factory):
    # quantize refuses rules that take no layer (rules 3 and 4 of RECIPE): the first two only
    path = tmp_path_factory.mktemp("recipe") / "used.toml"
    path.write_text(RECIPE[: RECIPE.index("[[rules]]\nmatch = \"model.layers.0.self_attn")])
    out = tmp_path_factory.mktemp("q") / "stories-mixed"
    result = runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(out), "--recipe", str(path),
        "--calibration", str(tinystories_text), "--num-samples", "8", "--seq-len", "128", "-q",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_run_report_has_every_field(quantized):
    raw = json.loads((quantized / "quantization_report.json").read_text())
    rows = {r["path"]: r for r in raw["layers"]}
    q = rows["model.layers.2.self_attn.k_proj"]
    for key in ("strategy", "bits", "group_size", "mode", "hessian_error", "relative_error",
                "n_tokens", "damping", "status", "reason", "time_s"):
        assert key in q
    assert q["strategy"] == "gptq" and q["bits"] == 4 and q["n_tokens"] == 8 * 128
    assert q["damping"] > 0 and q["hessian_error"] <= q["rtn_hessian_error"]
    assert rows["model.layers.0.self_attn.q_proj"]["strategy"] == "rtn"
    assert rows["model.layers.3.self_attn.q_proj"]["bits"] == 3
    assert rows["model.layers.1.mlp.down_proj"]["status"] == "skipped"
    assert "172" in rows["model.layers.1.mlp.down_proj"]["reason"]


def test_eval_quantized_json(quantized, tinystories_text):
    result = runner.invoke(app, ["eval", str(quantized), "--text", str(tinystories_text),
                                 "--num-samples", "4", "--seq-len", "128", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["quantized"] is True and data["num_samples"] == 4
    assert 1.0 < data["perplexity"] < 50.0


def test_eval_float_default_text_and_quiet(stories_dir):
    result = runner.invoke(app, ["eval", str(stories_dir), "--num-samples", "2", "--seq-len", "64"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "built-in text" in result.stdout
    quiet = runner.invoke(app, ["eval", str(stories_dir), "--num-samples", "2", "--seq-len", "64", "-q"])
    assert quiet.exit_code == 0 and float(quiet.stdout.strip()) > 1.0


def test_eval_errors(stories_dir, tmp_path):
    assert "does not exist" in one_line_error(runner.invoke(app, ["eval", str(tmp_path / "nope")]))
    assert "text file" in one_line_error(
        runner.invoke(app, ["eval", str(stories_dir), "--text", str(tmp_path / "none.txt")]))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    assert "fewer than one sequence" in one_line_error(
        runner.invoke(app, ["eval", str(stories_dir), "--text", str(short)]))
    assert one_line_error(runner.invoke(app, ["eval", str(stories_dir), "--seq-len", "1"]), 2)


def test_report_table_json_and_png(quantized, tmp_path):
    png = tmp_path / "plots" / "errors.png"
    result = runner.invoke(app, ["report", str(quantized), "--png", str(png), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "model.layers.4.mlp.up_proj" in result.stdout
    assert "worst layers by relative output error" in result.stdout
    assert "kept in full precision model.layers.0.mlp.down_proj" in result.stdout
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(runner.invoke(app, ["report", str(quantized), "--json", "--top", "2"]).stdout)
    assert len(data["summary"]["worst"]) == 2 and len(data["layers"]) == 36
    worst = max((r for r in data["layers"] if r["relative_error"] is not None),
                key=lambda r: r["relative_error"])
    assert data["summary"]["worst"][0] == worst["path"]
    assert runner.invoke(app, ["report", str(quantized), "-q"]).stdout == ""


def test_report_errors(stories_dir, tmp_path):
    assert "quantization_report.json" in one_line_error(runner.invoke(app, ["report", str(stories_dir)]))
    (tmp_path / "quantization_report.json").write_text("{not json")
    assert "not a quantkit run report" in one_line_error(runner.invoke(app, ["report", str(tmp_path)]))


def test_recipe_check_without_and_with_model(recipe_file, stories_dir):
    plain = runner.invoke(app, ["recipe", "check", str(recipe_file)])
    assert plain.exit_code == 0, plain.output
    assert "model.layers.0.*" in plain.stdout and "--model" in plain.stderr

    result = runner.invoke(app, ["recipe", "check", str(recipe_file), "--model", str(stories_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    layers = {d["path"]: d for d in data["layers"]}
    assert layers["model.layers.0.self_attn.q_proj"]["rule"] == 1
    assert layers["model.layers.0.self_attn.q_proj"]["strategy"] == "rtn"
    assert layers["model.layers.2.self_attn.q_proj"]["bits"] == 3
    assert layers["model.layers.2.mlp.down_proj"]["bits"] is None
    assert [r["layers"] for r in data["rules"]] == [7, 4, 0, 0]
    warnings = " ".join(data["warnings"])
    assert "rule 3" in warnings and "earlier rules" in warnings
    assert "rule 4" in warnings and "matches no layer" in warnings

    strict = runner.invoke(app, ["recipe", "check", str(recipe_file), "--model", str(stories_dir), "--strict", "-q"])
    assert strict.exit_code == 4 and strict.stdout == ""
    assert strict.stderr.count("warning:") == 2


def test_recipe_check_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nmatch = "*.q_proj"\nstrategy = "gptqq"\n')
    line = one_line_error(runner.invoke(app, ["recipe", "check", str(bad)]))
    assert "rule 1" in line and "'strategy'" in line and "gptqq" in line
    bad.write_text("[[rules]\n")
    assert "not valid TOML" in one_line_error(runner.invoke(app, ["recipe", "check", str(bad)]))


def test_inspect_lists_mixed_settings(quantized):
    result = runner.invoke(app, ["inspect", str(quantized)])
    assert result.exit_code == 0, result.output
    data = json.loads(runner.invoke(app, ["inspect", str(quantized), "--json"]).stdout)
    rows = {r["path"]: r for r in data["layers"]}
    assert rows["model.layers.0.self_attn.v_proj"]["bits"] == 8
    assert rows["model.layers.1.self_attn.q_proj"]["bits"] == 3


def test_quantize_bad_model_path_is_one_line(tmp_path):
    line = one_line_error(runner.invoke(app, ["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]))
    assert "does not exist" in line


def test_report_png_without_matplotlib_is_one_line(quantized, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    line = one_line_error(runner.invoke(app, ["report", str(quantized), "--png", str(tmp_path / "p.png")]))
    assert "matplotlib" in line and "quantkit[plot]" in line
    assert not (tmp_path / "p.png").exists()
