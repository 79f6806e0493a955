"""Models by Hugging Face repo id (quantkit.hub), offline against a fake cache: no network."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import ModelLoadError
from quantkit.hub import is_repo_id, resolve_model

runner = CliRunner()
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, stories_dir, monkeypatch):
    """A Hugging Face cache holding ``tiny-org/stories260K`` (a copy of stories260K), the
    layout ``snapshot_download`` reads: models--ORG--NAME/{snapshots/REV/..., refs/main}."""
    repo = tmp_path / "hub" / "models--tiny-org--stories260K"
    shutil.copytree(stories_dir, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / REV


def test_repo_id_form():
    assert is_repo_id("Qwen/Qwen3-8B") and is_repo_id("mlx-community/Llama-3.2-1B-Instruct-4bit")
    for path in ("./x", "/x", "x/y/z", "x", "../x/y", "~/x", "x/", "/org/name", "org/..", ""):
        assert not is_repo_id(path), path


def test_quantize_eval_inspect_by_repo_id(hub_cache, tmp_path, tinystories_text):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "tiny-org/stories260K", "-o", str(out), "--bits", "4",
                                 "--group-size", "32", "--num-samples", "4", "--seq-len", "64",
                                 "--calibration", str(tinystories_text), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["settings"]["source"] == str(hub_cache)
    shown = runner.invoke(app, ["inspect", "tiny-org/stories260K", "--json"])
    assert shown.exit_code == 1 and "is not quantized" in shown.stderr  # found, and read
    measured = runner.invoke(app, ["eval", "tiny-org/stories260K", "--text", str(tinystories_text),
                                   "--num-samples", "2", "--seq-len", "64", "--json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["perplexity"] > 1
    compared = runner.invoke(app, ["compare", str(out), "--reference", "tiny-org/stories260K",
                                   "--text", str(tinystories_text), "--num-samples", "2",
                                   "--seq-len", "64", "--json"])
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.stdout)["models"]
    assert [r["model"] for r in rows] == [str(out)] and rows[0]["kl_mean"] > 0


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return " ".join(lines)


def test_absent_repo_id_is_one_line_error(hub_cache, tmp_path):
    for command in (["quantize", "tiny-org/absent", "-o", str(tmp_path / "o")],
                    ["eval", "tiny-org/absent"], ["inspect", "tiny-org/absent"],
                    ["compare", "tiny-org/absent", "--reference", "tiny-org/stories260K"]):
        line = one_line_error(runner.invoke(app, command))
        assert "tiny-org/absent is neither a local directory nor in the Hugging Face cache" in line
        assert "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "o").exists()


def test_local_path_wins_and_paths_are_never_repo_ids(hub_cache, tmp_path, monkeypatch):
    # A local directory spelled like a repo id is the local directory.
    local = tmp_path / "cwd" / "tiny-org" / "stories260K"
    shutil.copytree(hub_cache, local)
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_model("tiny-org/stories260K") == local.relative_to(tmp_path / "cwd")
    # Missing paths that look like paths are "does not exist", never a Hub lookup; a cached
    # repo id is found even when a path of the same spelling with ./ is missing.
    shutil.rmtree(tmp_path / "cwd" / "tiny-org")
    for path in ("./tiny-org/stories260K", "./tiny-org/absent", "/nonexistent/x", "a/b/c",
                 "tiny-org"):
        with pytest.raises(ModelLoadError, match="does not exist; check the path"):
            resolve_model(path)
    assert resolve_model("tiny-org/stories260K") == hub_cache
