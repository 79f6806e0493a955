"""Top-level functions: quantize a model in memory, or a model directory into another."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .checkpoint import Checkpoint, DirectoryCheckpoint, checkpoint_dir, fingerprint, read_progress
from .data import Calibration, load_calibration
from .distributed import Distributed
from .errors import DistributedError, OutputError
from .host import resolve_backend
from .io import check_output, load_model, save_model
from .quantizers import Quantizer, RTNQuantizer
from .recipe import Recipe
from .registry import DEFAULT_REGISTRY, LayerRegistry
from .report import REPORT_NAME, RunReport
from .validate import check_settings
from .walker import ModelWalker, Progress, WalkResult


def quantize_model(
    model: nn.Module, tokens: mx.array, recipe: Recipe | None = None, *,
    registry: LayerRegistry = DEFAULT_REGISTRY, fallback: Quantizer | None = None,
    batch_size: int = 8, dtype: str | None = "float32", progress: Progress | None = None,
    checkpoint: Checkpoint | None = None, distributed: Distributed | None = None,
    backend: str = "auto",
) -> WalkResult:
    """Quantize ``model`` in place with ``recipe`` (default: GPTQ 4-bit, group 64) using
    calibration ``tokens (num_samples, seq_len)``; ``checkpoint`` makes the walk resumable.
    ``backend``: where the calibration's dense arithmetic runs (``"auto"``: NumPy on a CPU
    device, MLX otherwise; see :mod:`quantkit.host`).
    With ``distributed``, every rank of the group calls this with the same arguments; each rank
    ends with the whole quantized model."""
    walker = ModelWalker(
        recipe=recipe or Recipe(), registry=registry, fallback=fallback or RTNQuantizer(),
        batch_size=batch_size, dtype=dtype, progress=progress,
        distributed=distributed or Distributed(), backend=backend,
    )
    return walker.run(model, tokens, checkpoint=checkpoint)


@attrs.frozen
class DirectoryResult:
    out_dir: Path
    report: RunReport
    quantization: dict[str, Any]


def quantize_directory(
    model_dir: str | Path, out_dir: str | Path, recipe: Recipe | None = None, *,
    calibration: Calibration | str | Path | list[str] | None = None, num_samples: int = 128,
    seq_len: int = 512, seed: int = 0, dtype: str | None = "float32", batch_size: int = 8,
    overwrite: bool = False, resume: bool = False, checkpoint: bool = True,
    progress: Progress | None = None, distributed: Distributed | None = None,
    backend: str = "auto", registry: LayerRegistry = DEFAULT_REGISTRY,
) -> DirectoryResult:
    """Load ``model_dir``, quantize it, write ``out_dir`` (config.json, safetensors, tokenizer
    files, ``quantization_report.json``). ``calibration``: a text or JSONL file, a list of
    ``PATH[:WEIGHT]`` (a mixture), a :class:`~quantkit.data.Calibration`, or ``None`` for the
    offline default. Calibration warnings (see :func:`~quantkit.data.load_calibration`) go to
    ``progress("warning", {"message": ...})`` and into the report.

    The output appears atomically (see :func:`quantkit.io.save_model`). With ``checkpoint``,
    the state after every decoder block is kept in ``.NAME.checkpoint`` beside ``out_dir``
    (removed once the output is written); ``resume`` continues from it, with a byte-identical
    result. Without ``resume`` an existing checkpoint is an error unless ``overwrite``, which
    discards it.

    With ``distributed`` (a group of several processes), every rank calls this with the same
    arguments and rank 0 alone writes, once every rank has finished; checkpoints are not kept
    (each rank holds only its own calibration samples) and ``resume`` is refused.

    ``registry``: the layer handlers (e.g. a copy whose ``SwitchLinearHandler`` has
    ``calibrate_all_experts``, see :func:`quantkit.experts.with_all_experts`)."""
    from mlx_lm.utils import compute_bits_per_weight

    check_settings(seed=seed)  # reliab: before any work
    distributed = distributed or Distributed()
    writer = distributed.rank == 0  # the only rank that touches the output path
    out_dir = check_output(out_dir, overwrite, model_dir) if writer else Path(out_dir).absolute()
    ckpt_path = checkpoint_dir(out_dir)
    if writer and ckpt_path.exists() and not resume:
        done = read_progress(ckpt_path)
        if done and not overwrite:
            raise OutputError(
                f"an interrupted run left a checkpoint in {ckpt_path} ({done} blocks done); "
                "pass --resume to continue it or --overwrite to start over")
        with DirectoryCheckpoint(ckpt_path, {}) as stale:  # fails if a live run holds it
            stale.discard()
    recipe = recipe or Recipe()
    calib = calibration if isinstance(calibration, Calibration) else \
        Calibration.from_specs(calibration)  # a bad mixture spec fails before any loading
    model, tokenizer, config = load_model(model_dir)
    data = load_calibration(tokenizer, calib, num_samples, seq_len, seed,
                            max_positions=config.get("max_position_embeddings"))
    tokens = data.tokens
    for message in data.warnings:
        if progress is not None and writer:
            progress("warning", {"message": message})
    mx.random.seed(seed)
    ckpt = None
    if distributed.size > 1:
        if resume:
            raise DistributedError("--resume is not supported with several processes yet; "
                                   "resume in one process or start over with --overwrite")
    elif checkpoint or resume:
        ckpt = DirectoryCheckpoint(ckpt_path, fingerprint(
            model_dir, tokens, recipe=recipe.to_dict(), dtype=dtype, batch_size=batch_size,
            shards=distributed.num_shards, backend=resolve_backend(backend),
            **({"all_experts": True} if _all_experts(registry) else {})))
    with ckpt or contextlib.nullcontext(), _keep_only_progress(ckpt):
        result = quantize_model(model, tokens, recipe, batch_size=batch_size, dtype=dtype,
                                progress=progress, checkpoint=ckpt, distributed=distributed,
                                backend=backend, registry=registry)
        report = result.report
        report.bits_per_weight = float(compute_bits_per_weight(model))
        report.settings.update({
            "source": str(model_dir), "seed": seed, "calibration_data": data.to_report(),
            "calibration": calib.describe(),
            "requested_samples": num_samples, "shards": distributed.num_shards,
        })
        config = dict(config)
        config["quantization"] = result.quantization
        distributed.barrier("waiting for every rank to finish")
        if writer:
            try:
                save_model(out_dir, model, config, model_dir, overwrite=overwrite,
                           extra_files={REPORT_NAME: json.dumps(report.to_dict(), indent=2)})
            except OutputError as exc:
                if ckpt is None:
                    raise
                raise OutputError(f"{exc}; the quantized blocks are kept in {ckpt_path}: "
                                  "rerun with --resume once fixed") from None
        if ckpt is not None:
            ckpt.discard()
    return DirectoryResult(out_dir=out_dir, report=report, quantization=result.quantization)


def _all_experts(registry: LayerRegistry) -> bool:
    handler = registry.handler(SwitchLinear)
    return bool(getattr(handler, "calibrate_all_experts", False))


@contextlib.contextmanager
def _keep_only_progress(ckpt: DirectoryCheckpoint | None):
    """On failure, keep the checkpoint only if it holds a finished block."""
    try:
        yield
    except BaseException:
        if ckpt is not None and read_progress(ckpt.path) is None:
            ckpt.discard()
        raise
