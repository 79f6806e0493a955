"""Nothing lost on the way: every case of the regression matrix (``tests/regression_matrix.py``)
reproduces the digest recorded with the code before the streaming pipeline, byte for byte.

Recorded on a CPU; GPU arithmetic differs, so the test runs only where MLX's default device is
the CPU. Regenerate (only when a change of output is intended, and say why in the commit):
``OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python tests/regression_matrix.py --write``."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import shared_path
from regression_matrix import CASES, DIGESTS, run_case

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu, reason="digests were recorded with CPU arithmetic")


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_digest_unchanged(name, tmp_path):
    model = CASES[name][0]
    shared_path("models", model)
    shared_path("text", "tinystories_sample.txt")
    recorded = json.loads(DIGESTS.read_text())["digests"]
    assert name in recorded, f"no digest recorded for {name}; run {DIGESTS.name}'s generator"
    assert run_case(name, tmp_path) == recorded[name]
