"""ModelWalker: sequential, block-by-block calibration and quantization of an mlx-lm model.

For each decoder block: run the block's current inputs through it with collectors on the layers
that need statistics; quantize those layers (dropping each Hessian once used); run the now
quantized block to produce the next block's inputs. Layers outside the blocks (output head,
tied embedding) are done last, from the final block's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import Checkpoint, ResumeState
from .distributed import Distributed, ShardLayout
from .errors import CheckpointError, FactorizationError, ModelLoadError, RecipeError
from .hessian import HessianCollector, HessianStats
from .moe import quantize_expert_layers
from .packers import packer_for
from .predicate import apply_predicate, model_predicate
from .quantizers import Quantizer, QuantResult, RTNQuantizer
from .recipe import Recipe, Rule
from .registry import (
    DEFAULT_REGISTRY,
    LayerHandler,
    LayerRegistry,
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
        """Calibrated in the block's shared forward pass (expert layers have their own)."""
        return self.quantizer.needs_hessian and not self.handler.per_expert

    @property
    def per_expert(self) -> bool:
        """Calibrated one Hessian per expert, in expert-batch passes (see quantkit.moe)."""
        return self.quantizer.needs_hessian and self.handler.per_expert


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
    ``progress(event, info)`` is called with ``"capture"``, ``"block"`` and ``"layer"`` events,
    and ``"resume"`` (``index`` of the last block found in a checkpoint) when resuming.
    ``distributed``: the process group (default: this process alone); each rank calibrates on
    its own shards of the batches and quantizes its share of each block's layers.
    """

    recipe: Recipe = attrs.field(factory=Recipe)
    registry: LayerRegistry = DEFAULT_REGISTRY
    fallback: Quantizer = attrs.field(factory=RTNQuantizer)
    batch_size: int = 8
    dtype: str | None = "float32"
    progress: Progress | None = None
    distributed: Distributed = attrs.field(factory=Distributed)
    #: Obey the model's ``quant_predicate`` (e.g. an 8-bit MoE router) where no explicit
    #: recipe rule matches; see :mod:`quantkit.predicate`.
    use_model_predicate: bool = True

    def _emit(self, event: str, **info: Any) -> None:
        if self.progress is not None:
            self.progress(event, info)

    # -- planning ---------------------------------------------------------------------------

    def plan(self, model: nn.Module, report: RunReport | None = None) -> dict[str, LayerPlan]:
        """Decide, for every leaf module, what happens to it. Skipped layers go to ``report``."""
        plans: dict[str, LayerPlan] = {}
        quantizers: dict[int | None, Quantizer] = {}
        predicate = model_predicate(model) if self.use_model_predicate else None
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
            spec, model_note = rule.spec, None
            if predicate is not None and index is None:
                spec, model_note = apply_predicate(predicate, path, module, spec)
                if spec is None:
                    record.reason = model_note
                    if report is not None:
                        report.add(record)
                    continue
            wanted = spec
            spec = spec.fitted_to(weight.shape[-1])
            if spec is None:
                record.reason = (
                    f"input width {weight.shape[-1]} is not divisible by any group size "
                    f"allowed in mode {wanted.mode!r} {list(wanted.allowed_group_sizes())}"
                )
                if report is not None:
                    report.add(record)
                continue
            note = model_note
            if spec.group_size != wanted.group_size:
                note = "; ".join(n for n in (note, (
                    f"group size {wanted.group_size} does not divide width "
                    f"{weight.shape[-1]}: used {spec.group_size}")) if n)
            if index not in quantizers:
                quantizers[index] = rule.make_quantizer()
            plans[path] = LayerPlan(path, module, handler, index, rule, spec,
                                    quantizers[index], weight.dtype, note)
        return plans

    # -- the walk ---------------------------------------------------------------------------

    def run(self, model: nn.Module, tokens: mx.array,
            checkpoint: Checkpoint | None = None) -> WalkResult:
        """Quantize ``model`` in place using calibration ``tokens (num_samples, seq_len)``.

        With a ``checkpoint``, the state after each decoder block is saved to it, and a run
        finds there the blocks a previous (interrupted) run finished and continues after them."""
        start = time.perf_counter()
        report = RunReport()
        plans = self.plan(model, report)
        if not plans:
            why = report.layers[0].reason if report.layers else "it has no layer with a registered handler"
            raise RecipeError(f"no layer of this model can be quantized ({why}); change the recipe or group size")
        orig_dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
        if self.dtype is not None:
            model.set_dtype(_DTYPES[self.dtype])

        blocks = _decoder_blocks(model)
        paths = {id(m): p for p, m in model.named_modules()}
        block_paths = [paths[id(b)] for b in blocks]
        batches = [tokens[i : i + self.batch_size] for i in range(0, len(tokens), self.batch_size)]
        layout = self.distributed.layout(len(batches))
        batches = [batches[j] for j in layout.local_batches]

        resumed = self._resume(model, plans, report, checkpoint, len(blocks))
        needs_calibration = any(p.needs_stats or p.per_expert for p in plans.values())
        if needs_calibration:
            inputs, block_args = self._capture(model, blocks, block_paths, batches)
            if resumed is not None and resumed.next_block > 0:
                inputs = resumed.inputs
        for i, (block, bpath) in enumerate(zip(blocks, block_paths)):
            if resumed is not None and i < resumed.next_block:
                continue
            inside = [p for k, p in plans.items() if k.startswith(bpath + ".")]
            self._emit("block", index=i, total=len(blocks), path=bpath)
            stats = self._collect_sharded(
                model, inside, layout, partial(_forward, block, inputs, block_args[i])
            ) if needs_calibration else {}
            done = self._quantize_all(model, [p for p in inside if not p.per_expert], stats, report, i)
            experts = [p for p in inside if p.per_expert]
            if experts:
                done += self._quantize_experts(
                    model, experts, layout, partial(_forward, block, inputs, block_args[i]),
                    report, i, tokens.size,
                )
            if needs_calibration:
                inputs = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(inputs, block_args[i])]
            if checkpoint is not None:
                checkpoint.save(i, {k: dict(tree_flatten(m.parameters())) for k, m in done},
                                [r for r in report.layers if r.block == i],
                                inputs if needs_calibration else [])

        inside_blocks = tuple(bp + "." for bp in block_paths)
        outside = [p for k, p in plans.items() if not k.startswith(inside_blocks)]
        stats = {}
        if needs_calibration and any(p.needs_stats for p in outside):
            stats = self._collect_outside(model, blocks, block_paths, outside, batches, inputs, layout)
        self._quantize_all(model, outside, stats, report, None)

        _restore_dtypes(model, orig_dtypes)
        quantization = self._config(plans, report)
        report.time_s = time.perf_counter() - start
        report.world_size = self.distributed.size
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

    def _collect(self, model, plans: list[LayerPlan], forward) -> dict[str, HessianStats]:
        """Install collectors on the layers of ``plans`` that need them and run ``forward()``,
        an iterable of per-batch forward passes. Only the collectors are evaluated, so MLX
        computes no more of each forward than the collected inputs depend on."""
        wanted = [p for p in plans if p.needs_stats]
        if not wanted:
            return {}
        collectors = {p.path: p.handler.collector(p.module) for p in wanted}
        self._run_collectors(model, wanted, collectors, forward)
        return {k: c.stats() for k, c in collectors.items()}

    def _run_collectors(self, model, wanted: list[LayerPlan],
                        collectors: dict[str, HessianCollector], forward) -> None:
        catchers = [(p.path, p.handler.catcher(p.module, collectors[p.path])) for p in wanted]
        model.update_modules(tree_unflatten(catchers))
        try:
            for _ in forward():
                mx.eval([c.arrays() for c in collectors.values()])
        finally:
            model.update_modules(tree_unflatten([(p.path, p.module) for p in wanted]))

    def _quantize_experts(self, model, plans: list[LayerPlan], layout: ShardLayout, run_batch,
                          report, block_index, n_tokens: int):
        """Expert layers of one block: one Hessian per expert, a batch of experts per forward
        pass over the ``n_tokens`` calibration tokens, after the block's other layers are
        quantized (see quantkit.moe). Each expert's statistics go through the same shard tree
        as dense layers', so the result does not depend on the number of processes."""
        def collect(active, collectors):
            merged = self.distributed.reduce_stats(layout, lambda positions: _expert_shard_stats(
                model, self, active, collectors, lambda: (run_batch(j) for j in positions)))
            for p in active:
                _load_expert_stats(collectors[p.path], p.path, merged)

        new_modules = []
        for p, module, records in quantize_expert_layers(plans, collect, self.fallback, n_tokens):
            for record in records:
                record.block = block_index
                report.add(record)
                self._emit("layer", record=record)
            new_modules.append((p.path, module))
        model.update_modules(tree_unflatten(new_modules))
        return new_modules

    def _collect_sharded(self, model, plans, layout: ShardLayout, run_batch) -> dict[str, HessianStats]:
        """``_collect`` once per calibration shard of this rank (``run_batch(j)``: the forward
        pass of local batch ``j``); shard statistics combined across ranks in shard order."""
        if not any(p.needs_stats for p in plans):
            return {}
        return self.distributed.reduce_stats(layout, lambda positions: self._collect(
            model, plans, lambda: (run_batch(j) for j in positions)))

    def _collect_outside(self, model, blocks, block_paths, plans, batches, last_outputs, layout):
        replays = [_Replay(b, None) for b in blocks[:-1]] + [_Replay(blocks[-1], last_outputs)]
        model.update_modules(tree_unflatten(list(zip(block_paths, replays))))
        try:
            return self._collect_sharded(model, plans, layout, lambda j: model(batches[j]))
        finally:
            model.update_modules(tree_unflatten(list(zip(block_paths, blocks))))

    def _quantize_all(self, model, plans, stats, report, block_index) -> list[tuple[str, nn.Module]]:
        """Quantize this rank's share of ``plans``; every rank installs all of them."""
        owners = self.distributed.assign(plans)
        rank = self.distributed.rank
        done = {}
        for p in plans:
            layer_stats = stats.pop(p.path, None)
            if owners[p.path] == rank:
                done[p.path] = self.quantize_layer(p, layer_stats)
                done[p.path][1].block, done[p.path][1].rank = block_index, rank
        done = self.distributed.exchange_layers(plans, done, owners)
        new_modules = []
        for p in plans:
            module, record = done[p.path]
            report.add(record)
            self._emit("layer", record=record)
            new_modules.append((p.path, module))
        if new_modules:
            model.update_modules(tree_unflatten(new_modules))
        return new_modules

    def _resume(self, model, plans: dict[str, LayerPlan], report: RunReport,
                checkpoint: Checkpoint | None, n_blocks: int) -> ResumeState | None:
        """Put back the layers and records of the blocks ``checkpoint`` holds."""
        state = checkpoint.load() if checkpoint is not None else None
        if state is None:
            return None
        if state.next_block > n_blocks:
            raise CheckpointError(f"checkpoint holds {state.next_block} blocks, the model has {n_blocks}")
        modules = []
        for path, params in state.layers.items():
            p = plans.get(path)
            if p is None:
                raise CheckpointError(f"checkpoint holds layer {path}, which this run does not quantize")
            modules.append((path, p.handler.build(p.module, params, p.spec)))
        if modules:
            model.update_modules(tree_unflatten(modules))
        for record in state.records:
            report.add(record)
        self._emit("resume", index=state.next_block - 1, total=n_blocks)
        return state

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
            fallback_reason = f"{record.layer_class}: expert layer outside the decoder blocks"
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


def _forward(block: nn.Module, inputs: list[mx.array], args: list, j: int) -> mx.array:
    """Block ``block`` on local batch ``j``: its captured input and extra arguments."""
    return block(inputs[j], *args[j][0], **args[j][1])


def _expert_shard_stats(model, walker: ModelWalker, active: list[LayerPlan],
                        like: dict[str, HessianCollector], forward) -> dict[str, HessianStats]:
    """One calibration shard's per-expert statistics, flattened to plain
    :class:`HessianStats` keyed ``path#expert`` (plus ``path#counts``: every expert's share of
    the routed rows) so the shard tree merges each expert by its own token count."""
    fresh = {p.path: p.handler.collector(p.module, like[p.path].experts) for p in active}
    walker._run_collectors(model, active, fresh, forward)
    out: dict[str, HessianStats] = {}
    for path, c in fresh.items():
        counts = c.counts.astype(mx.float32)
        rows = int(mx.sum(c.counts).item())
        out[f"{path}#counts"] = HessianStats(h=counts / max(rows, 1), n_tokens=rows)
        if c.shared:
            out[f"{path}#shared"] = HessianStats(h=c.h[0], n_tokens=rows)
            continue
        for i, e in enumerate(c.experts):
            out[f"{path}#{e}"] = HessianStats(h=c.h[i], n_tokens=int(c.counts[e].item()))
    return out


def _load_expert_stats(collector, path: str, merged: dict[str, HessianStats]) -> None:
    """Put the merged statistics back into ``collector`` (its Hessians and token counts)."""
    total = merged[f"{path}#counts"]
    collector.counts = mx.round(total.h * total.n_tokens).astype(mx.int32)
    if collector.shared:
        collector.h = merged[f"{path}#shared"].h[None]
    else:
        collector.h = mx.stack([merged[f"{path}#{e}"].h for e in collector.experts])


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
