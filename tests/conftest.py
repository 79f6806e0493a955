"""Shared fixtures: paths into ../shared (skipping with a clear reason when absent), tiny models."""

from __future__ import annotations

import os
from pathlib import Path

# On a CUDA GPU, MLX multiplies float32 matrices in TF32 unless MLX_ENABLE_TF32=0 (read once,
# at the first matmul). The suite asserts float32 identities (a folded scale keeps the block's
# function to 1e-5, a chunked walk is byte for byte the unchunked one): run on an H100 with TF32
# (2026-12-07), 31 such tests failed by TF32 rounding alone and passed with it off. The product
# keeps MLX's default; the tests that compare against TF32 on purpose (test_speed_paths,
# test_host) hold their GPU tolerances either way. ``MLX_ENABLE_TF32=1 pytest`` runs with TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("os").environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the ../shared models and texts")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return shared_path("models", "stories260K")


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return shared_path("text", "tinystories_sample.txt")


@pytest.fixture(scope="session")
def stories_tokens(stories_dir, tinystories_text):
    """(calibration, evaluation) token windows from the two halves of the TinyStories sample."""
    from quantkit.calibration import make_batches, read_text, tokenize
    from quantkit.io import load_model

    _, tokenizer, _ = load_model(stories_dir)
    ids = tokenize(tokenizer, read_text(tinystories_text))
    half = len(ids) // 2
    return make_batches(ids[:half], 64, 256, seed=0), make_batches(ids[half:], 64, 256, seed=1)


def weight_bytes(out_dir: Path) -> dict[str, bytes]:
    """The bytes of an output's weight files (its safetensors shards and their index), by name:
    two outputs are byte-identical when these are equal."""
    out_dir = Path(out_dir)
    files = sorted(out_dir.glob("*.safetensors")) + sorted(out_dir.glob("*.safetensors.index.json"))
    assert files, f"{out_dir} holds no weights"
    return {f.name: f.read_bytes() for f in files}
