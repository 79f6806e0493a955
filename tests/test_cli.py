"""The typer CLI through CliRunner: quantize, inspect, and one-line errors on bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from quantkit.cli import app

runner = CliRunner()


def test_quantize_then_inspect(stories_dir, tinystories_text, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(out), "--bits", "3", "--group-size", "32",
        "--calibration", str(tinystories_text), "--num-samples", "8", "--seq-len", "128",
    ])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "bits per weight" in result.stderr
    assert "kept in full precision model.layers.0.mlp.down_proj" in " ".join(result.stderr.split())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 3

    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    rows = {r["path"]: r for r in json.loads(shown.stdout)["layers"]}
    assert rows["model.layers.2.self_attn.q_proj"]["bits"] == 3
    assert rows["model.layers.2.mlp.down_proj"]["quantized"] is False


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_model_path(tmp_path):
    line = one_line_error(runner.invoke(app, ["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]))
    assert "does not exist" in line
    assert not (tmp_path / "o").exists()


def test_bad_recipe(stories_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rules]]\nmatch = "*.q_proj"\nbits = 7\n')
    line = one_line_error(runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(tmp_path / "o"), "--recipe", str(recipe),
    ]))
    assert "rule 1" in line and "'bits'" in line
    assert not (tmp_path / "o").exists()


def test_bad_bits_flag(stories_dir, tmp_path):
    line = one_line_error(runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(tmp_path / "o"), "--bits", "7",
    ]))
    assert "bits=7" in line


def test_existing_output_is_not_clobbered(stories_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(runner.invoke(app, ["quantize", str(stories_dir), "-o", str(out)]))
    assert "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"
