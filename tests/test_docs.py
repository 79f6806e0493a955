"""README.md and docs/ only point at commands, options and files that exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_docs", REPO / "docs" / "check_docs.py")
check_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_docs)


def test_docs_reference_existing_things():
    known = check_docs.commands()
    assert {"quantize", "inspect", "eval", "report", "recipe check"} <= set(known)
    problems = [p for f in check_docs.FILES for p in check_docs.check(f, known)]
    assert problems == []


def test_checker_catches_mistakes(tmp_path):
    known = check_docs.commands()
    assert "unknown command" in check_docs.check_command("quantkit quantise m -o x", known)
    assert "no option --bitz" in check_docs.check_command("quantkit quantize m --bitz 4", known)
    assert check_docs.check_command("quantkit recipe check r.toml --model m", known) is None
    page = tmp_path / "page.md"
    page.write_text("[gone](nowhere.md) and `examples/missing.py`\n")
    problems = check_docs.check(page, known)
    assert len(problems) == 2 and "nowhere.md" in problems[0] and "examples/missing.py" in problems[1]


def test_strict_mode_finds_undocumented_options(tmp_path):
    known = {"quantize": {"--bits", "--overwrite", "--no-overwrite", "--help"}, "eval": {"--text"}}
    page = tmp_path / "cli.md"
    page.write_text("`quantkit quantize --bits 4 --overwrite`\n")
    missing = check_docs.undocumented(known, page)
    assert missing == ["docs/cli.md: command `quantkit eval` is not documented",
                       "docs/cli.md: option --text of `quantkit eval` is not documented"]
