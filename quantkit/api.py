"""Top-level functions: quantize a model in memory, or a model directory into another."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .calibration import auto_batch_size
from .checkpoint import (
    BlockFiles,
    Checkpoint,
    DirectoryCheckpoint,
    checkpoint_dir,
    fingerprint,
    holds_blocks,
    read_progress,
)
from .data import Calibration, load_calibration
from .distributed import Distributed
from .errors import CheckpointError, DistributedError, ModelLoadError, OutputError
from .host import resolve_backend
from .io import block_staging_dir, check_output, load_model, save_streamed
from .launch import TEMP_PREFIX
from .mlxlm import bits_per_weight
from .pipeline.source import Background, scan_weights
from .quantizers import Quantizer, RTNQuantizer
from .recipe import Recipe
from .registry import DEFAULT_REGISTRY, LayerRegistry
from .report import REPORT_NAME, RunReport
from .validate import check_settings
from .walker import ModelWalker, Progress, WalkResult


def quantize_model(
    model: nn.Module, tokens: mx.array, recipe: Recipe | None = None, *,
    registry: LayerRegistry = DEFAULT_REGISTRY, fallback: Quantizer | None = None,
    batch_size: int | None = None, dtype: str | None = "float32",
    progress: Progress | None = None, checkpoint: Checkpoint | None = None,
    distributed: Distributed | None = None, backend: str = "auto",
) -> WalkResult:
    """Quantize ``model`` in place with ``recipe`` (default: GPTQ 4-bit, group 64) using
    calibration ``tokens (num_samples, seq_len)``; ``checkpoint`` makes the walk resumable.
    ``batch_size``: sequences per forward pass (``None``:
    :func:`~quantkit.calibration.auto_batch_size`, 8 on a CPU).
    ``backend``: where the calibration's dense arithmetic runs (``"auto"``: NumPy on a CPU
    device, MLX otherwise; see :mod:`quantkit.host`).
    With ``distributed``, every rank of the group calls this with the same arguments; each rank
    ends with the whole quantized model. A recipe's ``[distill]`` table runs end-to-end
    distillation after the walk (:mod:`quantkit.pipeline.distill`)."""
    walker = ModelWalker(
        recipe=recipe or Recipe(), registry=registry, fallback=fallback or RTNQuantizer(),
        batch_size=batch_size or auto_batch_size(model, tokens.shape[-1]), dtype=dtype,
        progress=progress, distributed=distributed or Distributed(), backend=backend,
    )
    result = walker.run(model, tokens, checkpoint=checkpoint)
    return result


@attrs.frozen
class DirectoryResult:
    out_dir: Path
    report: RunReport
    quantization: dict[str, Any]


def quantize_directory(
    model_dir: str | Path, out_dir: str | Path, recipe: Recipe | None = None, *,
    calibration: Calibration | str | Path | list[str] | None = None, num_samples: int = 128,
    seq_len: int = 512, seed: int = 0, dtype: str | None = "float32", batch_size: int | None = None,
    overwrite: bool = False, resume: bool = False, checkpoint: bool = True,
    progress: Progress | None = None, distributed: Distributed | None = None,
    backend: str = "auto", registry: LayerRegistry = DEFAULT_REGISTRY,
) -> DirectoryResult:
    """Quantize ``model_dir`` into ``out_dir`` (config.json, safetensors shards in mlx-lm's
    layout, tokenizer files, ``quantization_report.json``), streaming: the weights are read
    lazily, one decoder block at a time, and each finished block is written out and dropped, so
    memory does not grow with the model's depth. ``calibration``: a text or JSONL file, a list
    of ``PATH[:WEIGHT]`` (a mixture), a :class:`~quantkit.data.Calibration`, or ``None`` for the
    offline default. Calibration warnings (see :func:`~quantkit.data.load_calibration`) go to
    ``progress("warning", {"message": ...})`` and into the report.

    The output appears atomically (see :func:`quantkit.io.save_streamed`). With ``checkpoint``,
    the finished blocks' files are kept in ``.NAME.checkpoint`` beside ``out_dir`` (removed once
    the output is written; see :mod:`quantkit.checkpoint`); ``resume`` continues from them, with
    a byte-identical result, and is a no-op when ``out_dir`` already holds the finished output.
    Without ``resume`` an existing checkpoint is an error unless ``overwrite``, which discards it.

    With ``distributed`` (a group of several processes), every rank calls this with the same
    arguments and rank 0 alone writes, once every rank has finished; checkpoints are not kept
    (each rank holds only its own calibration samples) and ``resume`` is refused.

    ``registry``: the layer handlers (e.g. a copy whose ``SwitchLinearHandler`` has
    ``calibrate_all_experts``, see :func:`quantkit.experts.with_all_experts`). ``batch_size``:
    sequences per forward pass (``None``: :func:`~quantkit.calibration.auto_batch_size`, 8 on
    a CPU)."""
    check_settings(seed=seed)  # reliab: before any work
    distributed = distributed or Distributed()
    writer = distributed.rank == 0  # the only rank that touches the output path
    ckpt_path = checkpoint_dir(out_dir)
    if writer and resume and not ckpt_path.exists():
        finished = _finished_output(out_dir, model_dir)
        if finished is not None:  # --resume after the run completed: nothing left to do
            return finished
    out_dir = check_output(out_dir, overwrite, model_dir) if writer else Path(out_dir).absolute()
    if writer and ckpt_path.exists() and not resume:
        if holds_blocks(ckpt_path) and not overwrite:
            done = read_progress(ckpt_path)
            what = f"{done} blocks done" if done is not None else "its progress.json is unreadable"
            raise OutputError(
                f"an interrupted run left a checkpoint in {ckpt_path} ({what}); "
                "pass --resume to continue it or --overwrite to start over")
        with DirectoryCheckpoint(ckpt_path, {}) as stale:  # fails if a live run holds it
            stale.discard()
    recipe = recipe or Recipe()
    keep = checkpoint or resume
    calib = calibration if isinstance(calibration, Calibration) else \
        Calibration.from_specs(calibration)  # a bad mixture spec fails before any loading
    if distributed.size > 1 and resume:
        raise DistributedError("--resume is not supported with several processes yet; "
                               "resume in one process or start over with --overwrite")
    # The weights stay on disk until a block uses them. One streaming pass over the files, on
    # a thread beside the tokenization and the blocks' work, checks them for NaN/Inf and, for a
    # checkpoint's fingerprint, hashes their bytes; see _scanned for where its verdict counts.
    phases: dict[str, float] = {}
    with _timed(phases, "load"):
        model, tokenizer, config = load_model(model_dir, lazy=True, check_finite=False)
    digest = writer and distributed.size == 1 and keep
    scan = Background(lambda: scan_weights(model_dir, digest=digest))
    with _timed(phases, "tokenize"):
        data = load_calibration(tokenizer, calib, num_samples, seq_len, seed,
                                max_positions=config.get("max_position_embeddings"))
        tokens = data.tokens
    batch_size = batch_size or auto_batch_size(model, tokens.shape[-1])
    for message in data.warnings:
        if progress is not None and writer:
            progress("warning", {"message": message})
    mx.random.seed(seed)
    ckpt: DirectoryCheckpoint | None = None
    store: Checkpoint | None = None
    staging: Path | None = None
    if writer and distributed.size == 1 and keep:
        # The weights' sha256s (the fingerprint covers their content) come from the scan: the
        # fingerprint is needed to verify a checkpoint (a resume waits for it) and to commit
        # blocks (a fresh run's blocks are committed once it is known: no waiting).
        hashes = _waited(phases, scan)
        settings = dict(recipe=recipe.to_dict(), dtype=dtype, batch_size=batch_size,
                        shards=distributed.num_shards, backend=resolve_backend(backend),
                        **({"all_experts": True} if _all_experts(registry) else {}))
        ckpt = store = DirectoryCheckpoint(ckpt_path, lambda: fingerprint(
            model_dir, tokens, weight_digests=hashes(), **settings), ready=scan.done)
    elif writer:
        staging = block_staging_dir(out_dir)
        store = BlockFiles(staging)
    else:
        # The other ranks write their finished blocks to scratch files too and drop them from
        # memory as rank 0 does: no rank's memory grows with the model's depth. Under
        # quantkit's launcher, in its directory (removed when the launcher exits, or by the
        # next launch if it was killed); else in TMPDIR.
        hostfile = os.environ.get("MLX_HOSTFILE", "")
        parent = Path(hostfile).parent if Path(hostfile).parent.name.startswith(TEMP_PREFIX) else None
        staging = Path(tempfile.mkdtemp(prefix=f"quantkit-rank{distributed.rank}-", dir=parent))
        store = BlockFiles(staging)
    try:
        with _scanned(scan), ckpt or contextlib.nullcontext(), _keep_only_progress(ckpt, scan):
            result = quantize_model(model, tokens, recipe, batch_size=batch_size, dtype=dtype,
                                    progress=_polling(scan, progress), checkpoint=store,
                                    distributed=distributed, backend=backend, registry=registry)
            _waited(phases, scan)()  # bad weights: no output
            if ckpt is not None:
                ckpt.flush()  # every block committed before the output is written
            report = result.report
            report.phases = {**phases, **report.phases}
            report.bits_per_weight = float(bits_per_weight(model))
            report.settings.update({
                "source": str(model_dir), "seed": seed, "calibration_data": data.to_report(),
                "calibration": calib.describe(),
                "requested_samples": num_samples, "shards": distributed.num_shards,
            })
            config = dict(config)
            config["quantization"] = result.quantization
            distributed.barrier("waiting for every rank to finish")
            if writer:
                assert store is not None
                try:
                    t0 = time.perf_counter()
                    # Distillation changed every block's scales and biases after its file was
                    # written: then every tensor comes from the model.
                    save_streamed(out_dir, model, config, model_dir,
                                  [] if recipe.distill is not None else store.files(),
                                  keep_blocks=ckpt is not None, overwrite=overwrite,
                                  extra_files={REPORT_NAME: json.dumps(report.to_dict(), indent=2)})
                    report.phases["write"] = report.phases.get("write", 0.0) + time.perf_counter() - t0
                except OutputError as exc:
                    if ckpt is None:
                        raise
                    raise OutputError(f"{exc}; the quantized blocks are kept in {ckpt_path}: "
                                      "rerun with --resume once fixed") from None
            if ckpt is not None:
                ckpt.discard()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return DirectoryResult(out_dir=out_dir, report=report, quantization=result.quantization)


def _finished_output(out_dir: str | Path, model_dir: str | Path) -> DirectoryResult | None:
    """The result a finished earlier run wrote to ``out_dir`` from ``model_dir`` (``None``
    when ``out_dir`` is not such an output)."""
    out_dir = Path(out_dir).absolute()
    try:
        report = RunReport.read(out_dir)
        quantization = json.loads((out_dir / "config.json").read_text())["quantization"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.settings.get("source") != str(model_dir):
        return None
    return DirectoryResult(out_dir=out_dir, report=report, quantization=quantization)


def _all_experts(registry: LayerRegistry) -> bool:
    handler = registry.handler(SwitchLinear)
    return bool(getattr(handler, "calibrate_all_experts", False))


@contextlib.contextmanager
def _scanned(scan: Background):
    """The weight scan's verdict over the run: an error of the run is replaced by the scan's
    when the weights are bad (NaN weights make NaN Hessians, a truncated file an MLX read error:
    the scan's message names the tensor or file). Interrupts are not held up by it."""
    try:
        yield
    except Exception:
        try:
            scan.result()
        except ModelLoadError as bad:
            raise bad from None
        raise


def _polling(scan: Background, progress: Progress | None) -> Progress:
    """``progress`` that first raises the scan's error once it has found one: a run on bad
    weights stops at the next event instead of finishing its blocks."""
    def polled(event: str, info: dict) -> None:
        if (error := scan.error()) is not None:
            raise error
        if progress is not None:
            progress(event, info)
    return polled


def _waited(phases: dict[str, float], scan: Background) -> Callable[[], Any]:
    """``scan.result``, the time spent waiting for it added to the ``check`` phase."""
    def result() -> Any:
        with _timed(phases, "check"):
            return scan.result()
    return result


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def _keep_only_progress(ckpt: DirectoryCheckpoint | None, scan: Background):
    """On failure (or Ctrl-C), commit the blocks written while the fingerprint was not yet known
    if it is now (and the weights passed the scan), then remove the checkpoint only if this run
    made it and committed no block in it: a checkpoint holding blocks is never deleted on its
    own (only ``--overwrite`` does)."""
    try:
        yield
    except BaseException:
        if ckpt is not None:
            if scan.done() and scan.error() is None:
                with contextlib.suppress(CheckpointError):  # the run's own error is the one to tell
                    ckpt.flush()
            if ckpt.created and ckpt.committed == 0:
                ckpt.discard()
        raise
