"""Top-level functions: quantize a model in memory, or a model directory into another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from .calibration import calibration_tokens
from .distributed import Distributed
from .io import load_model, save_model
from .quantizers import Quantizer, RTNQuantizer
from .recipe import Recipe
from .registry import DEFAULT_REGISTRY, LayerRegistry
from .report import REPORT_NAME, RunReport
from .walker import ModelWalker, Progress, WalkResult


def quantize_model(
    model: nn.Module, tokens: mx.array, recipe: Recipe | None = None, *,
    registry: LayerRegistry = DEFAULT_REGISTRY, fallback: Quantizer | None = None,
    batch_size: int = 8, dtype: str | None = "float32", progress: Progress | None = None,
    distributed: Distributed | None = None,
) -> WalkResult:
    """Quantize ``model`` in place with ``recipe`` (default: GPTQ 4-bit, group 64) using
    calibration ``tokens (num_samples, seq_len)``. With ``distributed``, every rank of the group
    calls this with the same arguments; each rank ends with the whole quantized model."""
    walker = ModelWalker(
        recipe=recipe or Recipe(), registry=registry, fallback=fallback or RTNQuantizer(),
        batch_size=batch_size, dtype=dtype, progress=progress,
        distributed=distributed or Distributed(),
    )
    return walker.run(model, tokens)


@attrs.frozen
class DirectoryResult:
    out_dir: Path
    report: RunReport
    quantization: dict[str, Any]


def quantize_directory(
    model_dir: str | Path, out_dir: str | Path, recipe: Recipe | None = None, *,
    calibration: str | Path | None = None, num_samples: int = 128, seq_len: int = 512,
    seed: int = 0, dtype: str | None = "float32", batch_size: int = 8,
    overwrite: bool = False, progress: Progress | None = None,
    distributed: Distributed | None = None,
) -> DirectoryResult:
    """Load ``model_dir``, quantize it, write ``out_dir`` (config.json, safetensors, tokenizer
    files, ``quantization_report.json``). ``calibration``: a text file, or ``None`` for the
    offline default. With ``distributed``, every rank calls this with the same arguments and
    rank 0 alone writes, once every rank has finished."""
    from mlx_lm.utils import compute_bits_per_weight

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        from .errors import OutputError

        raise OutputError(f"output directory {out_dir} already exists; pass --overwrite or another path")
    recipe = recipe or Recipe()
    model, tokenizer, config = load_model(model_dir)
    tokens = calibration_tokens(tokenizer, calibration, num_samples, seq_len, seed)
    mx.random.seed(seed)
    distributed = distributed or Distributed()
    result = quantize_model(model, tokens, recipe, batch_size=batch_size, dtype=dtype,
                            progress=progress, distributed=distributed)
    report = result.report
    report.bits_per_weight = float(compute_bits_per_weight(model))
    report.settings.update({
        "source": str(model_dir), "calibration": str(calibration or "builtin"), "seed": seed,
        "requested_samples": num_samples,
    })
    config = dict(config)
    config["quantization"] = result.quantization
    distributed.barrier("waiting for every rank to finish")
    if distributed.rank == 0:
        save_model(out_dir, model, config, model_dir, overwrite=overwrite,
                   extra_files={REPORT_NAME: json.dumps(report.to_dict(), indent=2)})
    return DirectoryResult(out_dir=out_dir, report=report, quantization=result.quantization)
