"""ModelWalker: sequential, block-by-block calibration and quantization of an mlx-lm model.

For each decoder block: run the block's current inputs through it with collectors on the layers
that need statistics; quantize those layers (dropping each Hessian once used); run the now
quantized block to produce the next block's inputs. Layers outside the blocks (output head,
tied embedding) are done last, from the final block's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import FactorizationError, ModelLoadError
from .hessian import HessianCollector, HessianStats
from .packers import packer_for
from .quantizers import Quantizer, QuantResult, RTNQuantizer
from .recipe import Recipe, Rule
from .registry import (
    DEFAULT_REGISTRY,
    LayerHandler,
    LayerRegistry,
    SwitchLinearHandler,
    Wrapper,
)
from .report import LayerRecord, RunReport
from .specs import QuantSpec

Progress = Callable[[str, dict[str, Any]], None]

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class _StopForward(Exception):
    pass


class _BlockRecorder(Wrapper):
    """Stands in for a decoder block while block inputs are captured: records the arguments the
    model passes (hidden states, masks, caches) and returns the hidden states unchanged."""

    def __init__(self, block: nn.Module, sink: list, last: bool) -> None:
        super().__init__(block)
        self.sink = sink
        self.last = last

    def __call__(self, x, *args, **kwargs):
        self.sink.append((x, args, kwargs))
        if self.last:
            raise _StopForward
        return x


class _Replay(Wrapper):
    """Stands in for a decoder block while the output head is calibrated: the last block replays
    its stored outputs, earlier blocks pass through."""

    def __init__(self, block: nn.Module, outputs: list[mx.array] | None) -> None:
        super().__init__(block)
        self.outputs = outputs
        self.calls = 0

    def __call__(self, x, *args, **kwargs):
        if self.outputs is None:
            return x
        out = self.outputs[self.calls]
        self.calls += 1
        return out


@attrs.define
class LayerPlan:
    path: str
    module: nn.Module
    handler: LayerHandler
    rule_index: int | None
    rule: Rule
    spec: QuantSpec
    quantizer: Quantizer
    storage_dtype: mx.Dtype
    note: str | None = None

    @property
    def needs_stats(self) -> bool:
        return self.quantizer.needs_hessian and not isinstance(self.handler, SwitchLinearHandler)


@attrs.define
class WalkResult:
    model: nn.Module
    quantization: dict[str, Any]
    report: RunReport


@attrs.define
class ModelWalker:
    """Wiring: recipe + layer registry + fallback strategy. ``run`` does the work.

    ``dtype``: the dtype calibration runs in (float32 by default: half types are slow on CPU
    and MoE ``gather_mm`` needs float32 there); stored scales keep each layer's own dtype.
    ``progress(event, info)`` is called with ``"capture"``, ``"block"`` and ``"layer"`` events.
    """

    recipe: Recipe = attrs.field(factory=Recipe)
    registry: LayerRegistry = DEFAULT_REGISTRY
    fallback: Quantizer = attrs.field(factory=RTNQuantizer)
    batch_size: int = 8
    dtype: str | None = "float32"
    progress: Progress | None = None

    def _emit(self, event: str, **info: Any) -> None:
        if self.progress is not None:
            self.progress(event, info)

    # -- planning ---------------------------------------------------------------------------

    def plan(self, model: nn.Module, report: RunReport | None = None) -> dict[str, LayerPlan]:
        """Decide, for every leaf module, what happens to it. Skipped layers go to ``report``."""
        plans: dict[str, LayerPlan] = {}
        quantizers: dict[int | None, Quantizer] = {}
        for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            handler = self.registry.get(module)
            if handler is None:
                if hasattr(module, "to_quantized") and report is not None:
                    report.add(LayerRecord(
                        path, type(module).__name__, "skipped",
                        reason=f"no handler registered for class {type(module).__name__}",
                    ))
                continue
            weight = handler.weight(module)
            record = LayerRecord(path, type(module).__name__, "skipped", n_params=weight.size)
            index, rule = self.recipe.resolve(path)
            record.rule = index
            if rule.skip:
                record.reason = "recipe: skip" + (f" (rule {index + 1})" if index is not None else "")
                if report is not None:
                    report.add(record)
                continue
            spec = rule.spec.fitted_to(weight.shape[-1])
            if spec is None:
                record.reason = (
                    f"input width {weight.shape[-1]} is not divisible by any group size "
                    f"allowed in mode {rule.spec.mode!r} {list(rule.spec.allowed_group_sizes())}"
                )
                if report is not None:
                    report.add(record)
                continue
            note = None
            if spec.group_size != rule.spec.group_size:
                note = (f"group size {rule.spec.group_size} does not divide width "
                        f"{weight.shape[-1]}: used {spec.group_size}")
            if index not in quantizers:
                quantizers[index] = rule.make_quantizer()
            plans[path] = LayerPlan(path, module, handler, index, rule, spec,
                                    quantizers[index], weight.dtype, note)
        return plans

    # -- the walk ---------------------------------------------------------------------------

    def run(self, model: nn.Module, tokens: mx.array) -> WalkResult:
        """Quantize ``model`` in place using calibration ``tokens (num_samples, seq_len)``."""
        start = time.perf_counter()
        report = RunReport()
        plans = self.plan(model, report)
        orig_dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
        if self.dtype is not None:
            model.set_dtype(_DTYPES[self.dtype])

        blocks = _decoder_blocks(model)
        paths = {id(m): p for p, m in model.named_modules()}
        block_paths = [paths[id(b)] for b in blocks]
        batches = [tokens[i : i + self.batch_size] for i in range(0, len(tokens), self.batch_size)]

        needs_calibration = any(p.needs_stats for p in plans.values())
        if needs_calibration:
            inputs, block_args = self._capture(model, blocks, block_paths, batches)
        # Full-precision block inputs, for strategies that compare them with the quantized ones.
        ref_inputs = list(inputs) if needs_calibration and any(
            p.quantizer.needs_reference for p in plans.values()) else None
        for i, (block, bpath) in enumerate(zip(blocks, block_paths)):
            inside = [p for k, p in plans.items() if k.startswith(bpath + ".")]
            self._emit("block", index=i, total=len(blocks), path=bpath)
            stats = self._collect(model, inside, lambda: (
                block(x, *a, **kw) for x, (a, kw) in zip(inputs, block_args[i])
            ), reference=None if ref_inputs is None else lambda: (
                block(x, *a, **kw) for x, (a, kw) in zip(ref_inputs, block_args[i])
            )) if needs_calibration else {}
            if ref_inputs is not None:
                ref_inputs = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(ref_inputs, block_args[i])]
            self._quantize_all(model, inside, stats, report, i)
            if needs_calibration:
                inputs = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(inputs, block_args[i])]

        inside_blocks = tuple(bp + "." for bp in block_paths)
        outside = [p for k, p in plans.items() if not k.startswith(inside_blocks)]
        stats = {}
        if needs_calibration and any(p.needs_stats for p in outside):
            stats = self._collect_outside(model, blocks, block_paths, outside, batches, inputs)
        self._quantize_all(model, outside, stats, report, None)

        _restore_dtypes(model, orig_dtypes)
        quantization = self._config(plans, report)
        report.time_s = time.perf_counter() - start
        report.settings = {"recipe": self.recipe.to_dict(), "num_samples": int(tokens.shape[0]),
                           "seq_len": int(tokens.shape[1]), "calibration_dtype": self.dtype}
        try:
            report.peak_memory_gb = mx.get_peak_memory() / 1e9
        except AttributeError:  # older MLX
            report.peak_memory_gb = None
        return WalkResult(model=model, quantization=quantization, report=report)

    @staticmethod
    def _eval(x: mx.array) -> mx.array:
        mx.eval(x)
        return x

    def _capture(self, model, blocks, block_paths, batches):
        """Inputs of block 0 and the extra arguments of every block, one entry per batch."""
        sinks: list[list] = [[] for _ in blocks]
        originals = list(blocks)
        model.update_modules(tree_unflatten([
            (p, _BlockRecorder(b, s, last=(i == len(blocks) - 1)))
            for i, (p, b, s) in enumerate(zip(block_paths, blocks, sinks))
        ]))
        try:
            for b, batch in enumerate(batches):
                self._emit("capture", index=b, total=len(batches))
                try:
                    model(batch)
                except _StopForward:
                    pass
        finally:
            model.update_modules(tree_unflatten(list(zip(block_paths, originals))))
        inputs = [self._eval(x) for x, _, _ in sinks[0]]
        block_args = [[(a, kw) for _, a, kw in s] for s in sinks]
        return inputs, block_args

    def _collect(self, model, plans: list[LayerPlan], forward, reference=None) -> dict[str, HessianStats]:
        """Install collectors on the layers of ``plans`` that need them and run ``forward()``,
        an iterable of per-batch forward passes. Only the collectors are evaluated, so MLX
        computes no more of each forward than the collected inputs depend on.

        ``reference()``, when given, yields the same batches' full-precision forward passes:
        each runs just before its batch's ``forward`` pass, with the collectors of strategies
        that need it set to ``recording`` (they keep the layer inputs it shows them)."""
        wanted = [p for p in plans if p.needs_stats]
        if not wanted:
            return {}
        collectors: dict[str, HessianCollector] = {}
        catchers = []
        for p in wanted:
            collectors[p.path] = p.quantizer.collector(p.handler, p.module)
            catchers.append((p.path, p.handler.catcher(p.module, collectors[p.path])))
        model.update_modules(tree_unflatten(catchers))
        paired = [collectors[p.path] for p in wanted if p.quantizer.needs_reference]
        passes = forward() if reference is None or not paired else _paired(forward(), reference(), paired)
        try:
            for _ in passes:
                mx.eval([c.arrays() for c in collectors.values()])
        finally:
            model.update_modules(tree_unflatten([(p.path, p.module) for p in wanted]))
        return {k: c.stats() for k, c in collectors.items()}

    def _collect_outside(self, model, blocks, block_paths, plans, batches, last_outputs):
        replays = [_Replay(b, None) for b in blocks[:-1]] + [_Replay(blocks[-1], last_outputs)]
        model.update_modules(tree_unflatten(list(zip(block_paths, replays))))
        try:
            return self._collect(model, plans, lambda: (model(b) for b in batches))
        finally:
            model.update_modules(tree_unflatten(list(zip(block_paths, blocks))))

    def _quantize_all(self, model, plans, stats, report, block_index) -> None:
        new_modules = []
        for p in plans:
            module, record = self.quantize_layer(p, stats.pop(p.path, None))
            record.block = block_index
            report.add(record)
            self._emit("layer", record=record)
            new_modules.append((p.path, module))
        if new_modules:
            model.update_modules(tree_unflatten(new_modules))

    def quantize_layer(self, p: LayerPlan, stats: HessianStats | None) -> tuple[nn.Module, LayerRecord]:
        """Quantize one planned layer; fall back to ``self.fallback`` when its strategy cannot
        run (no calibration tokens, Hessian not factorizable, no per-expert support)."""
        t0 = time.perf_counter()
        weight = p.handler.weight(p.module).astype(mx.float32)
        record = LayerRecord(
            p.path, type(p.module).__name__, "quantized", strategy=p.quantizer.name,
            requested=p.rule.strategy, rule=p.rule_index, bits=p.spec.bits,
            group_size=p.spec.group_size, mode=p.spec.mode, reason=p.note, n_params=weight.size,
            n_tokens=None if stats is None else stats.n_tokens,
        )
        fallback_reason = None
        if p.quantizer.needs_hessian and not p.needs_stats:
            fallback_reason = f"{record.layer_class}: per-expert Hessians not supported yet"
        elif p.quantizer.needs_hessian and (stats is None or stats.n_tokens == 0):
            fallback_reason = "no calibration activations reached this layer"
        result: QuantResult | None = None
        if fallback_reason is None:
            try:
                result = p.quantizer.quantize(weight, p.spec, stats, p.storage_dtype)
            except FactorizationError as exc:
                fallback_reason = str(exc)
        if result is None:
            result = self.fallback.quantize(weight, p.spec, stats, p.storage_dtype)
            record.status = "fallback"
            record.strategy = self.fallback.name
            record.reason = "; ".join(r for r in (p.note, fallback_reason) if r)
        record.damping = result.info.get("damping")
        if stats is not None and stats.n_tokens > 0 and weight.ndim == 2:
            record.hessian_error, record.relative_error, record.rtn_hessian_error = _errors(
                weight, result.dequantized, stats.h, p.spec, p.storage_dtype
            )
        packed = packer_for(p.spec.mode).pack(result, mx.float32 if p.spec.mode == "affine" else p.storage_dtype)
        module = p.handler.build(p.module, packed, p.spec)
        mx.eval(module.parameters())
        record.time_s = time.perf_counter() - t0
        return module, record

    def _config(self, plans: dict[str, LayerPlan], report: RunReport) -> dict[str, Any]:
        """``config["quantization"]``: the default plus a full dict for every layer that differs
        from it, ``False`` for every quantizable layer left in full precision."""
        default = self.recipe.default.spec
        config: dict[str, Any] = default.to_config()
        for r in report.layers:
            if r.status == "skipped":
                config[r.path] = False
            elif (r.bits, r.group_size, r.mode) != (default.bits, default.group_size, default.mode) \
                    or self.recipe.default.skip:
                config[r.path] = {"group_size": r.group_size, "bits": r.bits, "mode": r.mode}
        return config


def _paired(passes, references, collectors):
    """Each reference pass (collectors ``recording``) followed by its batch's pass."""
    passes, references = iter(passes), iter(references)
    while True:
        for c in collectors:
            c.recording = True
        try:
            done = next(references, None) is None
        finally:
            for c in collectors:
                c.recording = False
        if done:
            return
        yield next(passes)


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None and "model" in model:
        layers = getattr(model["model"], "layers", None)
    if not layers:
        raise ModelLoadError(
            f"model class {type(model).__name__} exposes no decoder blocks (`layers`); "
            "quantkit walks mlx-lm decoder models"
        )
    return list(layers)


def _errors(w: mx.array, w_hat: mx.array, h: mx.array, spec: QuantSpec, dtype: mx.Dtype):
    """Hessian-weighted error of ``w_hat``, relative to the output energy, and RTN's for scale.

    Computed with NumPy (float64): on CPU builds of MLX its BLAS is far faster."""
    from .quantizers import round_to_nearest

    h64 = np.asarray(h, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64)

    def err(x: mx.array) -> float:
        d = w64 - np.asarray(x, dtype=np.float64)
        return float(np.einsum("ij,ij->", d @ h64, d))

    energy = float(np.einsum("ij,ij->", w64 @ h64, w64))
    e = err(w_hat)
    rtn = err(round_to_nearest(w, spec, dtype).dequantized)
    return e, (e / energy if energy > 0 else 0.0), rtn


def _restore_dtypes(model: nn.Module, orig: dict[str, mx.Dtype]) -> None:
    """Give every parameter back its original dtype; scales/biases of quantized layers take the
    dtype of the weight they replace."""
    updates = []
    for path, value in tree_flatten(model.parameters()):
        base, _, leaf = path.rpartition(".")
        target = orig.get(path)
        if leaf in ("scales", "biases") and value.dtype != mx.uint8:
            target = orig.get(f"{base}.weight", target)
        if target is not None and value.dtype != target and mx.issubdtype(value.dtype, mx.floating):
            updates.append((path, value.astype(target)))
    if updates:
        model.update(tree_unflatten(updates))
