"""Every script in examples/ runs as a subprocess on stories260K (skipped without ../shared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))
EXPECT = {
    "quantize_model.py": "bits per weight",
    "mixed_recipe.py": "rule 1",
    "custom_quantizer.py": "clip_rtn",
    "evaluate.py": "gptq   perplexity",
}


def test_every_example_is_tested():
    assert sorted(EXPECT) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, stories_dir, tinystories_text):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, str(Path("examples") / name), str(stories_dir), "--text", str(tinystories_text)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert EXPECT[name] in proc.stdout, proc.stdout[-2000:]
