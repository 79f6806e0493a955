"""ModelWalker: sequential, block-by-block calibration and quantization of an mlx-lm model.

For each decoder block: run the block's current inputs through it with collectors on the layers
that need statistics; quantize those layers (dropping each Hessian once used); run the now
quantized block to produce the next block's inputs. Layers outside the blocks (output head,
tied embedding) are done last, from the final block's outputs.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .arch import ArchSpec, arch_for, decoder_blocks, shared_input_groups
from .blocks.base import BlockContext
from .checkpoint import Checkpoint, ResumeState
from .distributed import Distributed, ShardLayout
from .errors import CheckpointError, FactorizationError, ModelLoadError, RecipeError
from .experts import AllExpertsCalibration, experts_parents
from .hessian import HessianCollector, HessianStats
from .host import (
    BACKENDS,
    HostLinear,
    host_attention,
    host_collector,
    resolve_backend,
    runs_on_host,
)
from .interrupt import check
from .moe import quantize_expert_layers
from .packers import packer_for
from .pipeline.plan import LayerPlan, layer_cost
from .pipeline.shards import final_arrays, reload_lazily
from .predicate import apply_predicate, model_predicate
from .quantizers import Quantizer, QuantResult, RTNQuantizer, hessian_figures
from .recipe import Recipe
from .registry import (
    DEFAULT_REGISTRY,
    LayerRegistry,
    Wrapper,
)
from .report import LayerRecord, RunReport
from .validate import check_packed, check_rules, plan_winners

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
    #: While a block computes the next block's inputs, its quantized layers run as dense
    #: layers holding their dequantized weights (same values), swapped for the quantized layers
    #: right after. Measured: MLX's CPU quantized matmul is ~30x slower than a dense one, and on
    #: an H200 the quantized blocks' forward passes took 37 s of a Qwen3-8B run. Costs one
    #: block's dense weights beside its packed ones. ``None``: on, except on Apple GPUs (fast
    #: quantized matmul, unified memory).
    dense_standins: bool | None = None
    #: Compute backend of the calibration's dense arithmetic: the block's ``nn.Linear`` layers
    #: and the ``XᵀX`` of their inputs. ``"numpy"`` (what ``"auto"`` picks on a CPU device):
    #: NumPy's BLAS, ~10x MLX's Linux CPU wheel (see :mod:`quantkit.host`); ``"mlx"``: MLX.
    backend: str = attrs.field(default="auto", validator=attrs.validators.in_(BACKENDS))
    _final: list | None = attrs.field(default=None, init=False, repr=False)
    _host: bool = attrs.field(default=False, init=False, repr=False)
    _runners: dict = attrs.field(factory=dict, init=False, repr=False)
    _host_forward: bool = attrs.field(default=True, init=False, repr=False)
    _phases: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # The recipe's [moe] options (e.g. calibrate_all_experts) on the expert handler.
        self.registry = self.recipe.layer_registry(self.registry)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to phase ``name`` of the report."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - t0

    def _emit(self, event: str, **info: Any) -> None:
        check(event)  # reliab: every progress event is a place to stop (quantkit.interrupt)
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
        self._host = resolve_backend(self.backend) == "numpy"
        with host_attention(model) if self._host else contextlib.nullcontext():
            return self._run(model, tokens, checkpoint)

    def _run(self, model: nn.Module, tokens: mx.array, checkpoint: Checkpoint | None) -> WalkResult:
        start = time.perf_counter()
        self._phases = {}
        report = RunReport()
        plans = self.plan(model, report)
        if not plans:
            why = report.layers[0].reason if report.layers else "it has no layer with a registered handler"
            raise RecipeError(f"no layer of this model can be quantized ({why}); change the recipe or group size")
        check_rules(self.recipe, plan_winners(plans, report.layers))  # reliab: no silent no-op rule
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
        standins = self.dense_standins
        if standins is None:
            standins = mx.default_device() == mx.cpu or not mx.metal.is_available()
        self._final = [] if standins and needs_calibration else None
        if needs_calibration:
            with self._phase("calibrate"):
                inputs, block_args = self._capture(model, blocks, block_paths, batches)
        # Full-precision block inputs, for strategies that compare them with the quantized ones.
        ref_inputs = list(inputs) if needs_calibration and any(
            p.quantizer.needs_reference for p in plans.values()) else None
        if ref_inputs is not None and (self.distributed.size > 1 or resumed is not None):
            raise RecipeError("strategies that need full-precision inputs (gptaq) run in one "
                              "process without --resume; use gptq for distributed or resumed runs")
        transforms = tuple(getattr(self.recipe, "transforms", ()) or ())
        optimizers = tuple(getattr(self.recipe, "optimizers", ()) or ())
        if (transforms or optimizers) and not needs_calibration:
            raise RecipeError("block transforms and optimizers need calibration data; use a "
                              "strategy that calibrates (e.g. gptq), not only rtn")
        for i, (block, bpath) in enumerate(zip(blocks, block_paths)):
            # Plans are dropped once their block is done: with them go the original layers.
            inside = [plans.pop(k) for k in list(plans) if k.startswith(bpath + ".")]
            if resumed is not None and i < resumed.next_block:
                # A finished block: its quantized layers come from its file, and it computes
                # the next block's inputs exactly as it did in the run that wrote it.
                with self._phase("resume"):
                    # Its other parameters (norms, kept layers) come from the file too: block
                    # transforms may have changed them.
                    _float_params_from_file(model, inside, resumed.files[i], bpath,
                                            _DTYPES.get(self.dtype or ""))
                    self._install(model, inside, _from_file(inside, resumed.files[i]))
                    if needs_calibration:
                        inputs = [self._eval(block(x, *a, **kw))
                                  for x, (a, kw) in zip(inputs, block_args[i])]
                    self._swap_standins(model)
                    reload_lazily(model, resumed.files[i])
                continue
            self._runners.clear()
            self._emit("block", index=i, total=len(blocks), path=bpath)
            ctx = None
            if transforms or optimizers:
                ctx = self._context(model, i, bpath, block, inputs, block_args[i])
            for t in transforms:  # before statistics: they see the transformed weights
                self._record_method(report, i, "transform", t, t.apply(ctx))
                _rebind(model, inside)
            targets = None
            if optimizers:  # the float block's outputs, before its layers are replaced
                with self._phase("calibrate"):
                    targets = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(inputs, block_args[i])]
            with self._phase("calibrate"):
                stats = self._collect_sharded(
                    model, inside, layout, partial(_forward, block, inputs, block_args[i]),
                    None if ref_inputs is None else partial(_forward, block, ref_inputs, block_args[i]),
                ) if needs_calibration else {}
                if ref_inputs is not None:
                    ref_inputs = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(ref_inputs, block_args[i])]
            with self._phase("solve"):
                done = self._quantize_all(model, [p for p in inside if not p.per_expert], stats, report, i)
                experts = [p for p in inside if p.per_expert]
                if experts:
                    done += self._quantize_experts(
                        model, experts, layout, partial(_forward, block, inputs, block_args[i]),
                        report, i, tokens.size,
                    )
            if optimizers:
                assert ctx is not None
                with self._phase("optimize"):
                    self._optimize(model, report, attrs.evolve(
                        ctx, float_layers={p.path[len(bpath) + 1:]: p.module for p in inside}),
                        inside, optimizers, targets)
                del targets
            if needs_calibration:
                with self._phase("calibrate"):
                    inputs = [self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(inputs, block_args[i])]
            # The block has produced the next block's inputs and never runs again (the layers
            # outside the blocks are calibrated from the last block's stored outputs): its
            # quantized layers replace its dense stand-ins now, so at most one block's
            # stand-ins are ever held.
            self._swap_standins(model)
            self._runners.clear()
            del done
            if checkpoint is not None:
                # Written out, the block's arrays become lazy loads of its file: the memory a
                # run holds does not grow with the number of blocks.
                with self._phase("write"):
                    path = checkpoint.save(i, final_arrays(block, bpath, orig_dtypes),
                                           [r for r in report.layers if r.block == i])
                    reload_lazily(model, path)

        del inside  # the last block's plans
        self._final = None
        outside = list(plans.values())  # what is left: layers outside the decoder blocks
        stats = {}
        if needs_calibration and any(p.needs_stats for p in outside):
            with self._phase("calibrate"):
                stats = self._collect_outside(model, blocks, block_paths, outside, batches, inputs, layout)
        with self._phase("solve"):
            self._quantize_all(model, outside, stats, report, None)
        _restore_dtypes(model, orig_dtypes)
        quantization = self._config(report)
        report.time_s = time.perf_counter() - start
        report.world_size = self.distributed.size
        report.phases = dict(self._phases)
        report.settings = {"recipe": self.recipe.to_dict(), "num_samples": int(tokens.shape[0]),
                           "seq_len": int(tokens.shape[1]), "calibration_dtype": self.dtype}
        try:
            report.peak_memory_gb = mx.get_peak_memory() / 1e9
        except AttributeError:  # older MLX
            report.peak_memory_gb = None
        return WalkResult(model=model, quantization=quantization, report=report)

    # -- block methods ----------------------------------------------------------------------

    def _context(self, model, index: int, path: str, block, inputs, args) -> BlockContext:
        """The :class:`BlockContext` of block ``index`` (its inputs, forward, architecture table
        and a sum over every rank)."""
        model_type = getattr(model, "model_type", None) or getattr(
            getattr(model, "args", None), "model_type", "unknown")
        try:
            arch = arch_for(model_type)
        except ModelLoadError:
            if getattr(self.recipe, "transforms", ()):
                raise  # transforms need the table: a one-line error naming the model type
            arch = ArchSpec(model_types=(model_type,))  # optimizers only: no table needed
        return BlockContext(
            index=index, path=path, block=block, inputs=inputs,
            forward=lambda module, j: module(inputs[j], *args[j][0], **args[j][1]),
            arch=arch, reduce=self.distributed.sum, seed=index, spec=self.recipe.default.spec,
        )

    def _record_method(self, report: RunReport, index: int, kind: str, method, figures) -> None:
        entry = {"block": index, "kind": kind, "name": getattr(method, "name", type(method).__name__),
                 "figures": dict(figures or {})}
        report.block_methods.append(entry)
        self._emit(kind, **entry)

    def _optimize(self, model, report: RunReport, ctx: BlockContext, inside: list[LayerPlan],
                  optimizers, targets) -> None:
        """Run the optimizers on the block's quantized layers (dense stand-ins put aside), then
        put stand-ins of the optimized layers back for the block's last forward pass."""
        self._swap_standins(model)
        for o in optimizers:
            self._record_method(report, ctx.index, "optimizer", o, o.optimize(ctx, targets))
        if self._final is not None:
            current = dict(model.named_modules())
            self._install(model, inside, [(p.path, current[p.path]) for p in inside])

    def _runner(self, module: nn.Module) -> nn.Module:
        """What computes ``module``'s outputs during calibration: a :class:`HostLinear` (made
        once per block) with NumPy compute, else the module itself."""
        if not (self._host and self._host_forward and runs_on_host(module)):
            return module
        if id(module) not in self._runners:
            self._runners[id(module)] = (module, HostLinear(module))
        return self._runners[id(module)][1]

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

    def _collect(self, model, plans: list[LayerPlan], forward, reference=None
                 ) -> tuple[dict[str, HessianStats], dict[str, str]]:
        """Install collectors on the layers of ``plans`` that need them and run ``forward()``,
        an iterable of per-batch forward passes. Only the collectors are evaluated, so MLX
        computes no more of each forward than the collected inputs depend on.

        Layers that read the very same input array (q/k/v projections; gate/up) share one
        collector: their Hessian is accumulated once and the same :class:`HessianStats` object
        is returned under each of their paths. Returns ``(stats, owners)``: ``owners[path]`` is
        the path whose collector accumulated ``path``'s inputs.

        ``reference()``, when given, yields the same batches' full-precision forward passes:
        each runs just before its batch's ``forward`` pass, with the collectors of strategies
        that need it set to ``recording`` (they keep the layer inputs it shows them) and the
        other collectors muted."""
        wanted = [p for p in plans if p.needs_stats]
        if not wanted:
            return {}, {}
        pool = _InputPool()
        collectors: dict[str, HessianCollector] = {}
        catchers = []
        for p in wanted:
            inner = p.quantizer.collector(p.handler, p.module)
            if p.quantizer.needs_reference:
                collectors[p.path] = inner
            else:
                inner = host_collector(inner) if self._host else inner
                collectors[p.path] = _SharingCollector(p.path, inner, pool)
            catchers.append((p.path, p.handler.catcher(self._runner(p.module), collectors[p.path])))
        model.update_modules(tree_unflatten(catchers))
        paired = [collectors[p.path] for p in wanted if p.quantizer.needs_reference]
        muted = [c for c in collectors.values() if isinstance(c, _SharingCollector)]
        passes = (forward() if reference is None or not paired
                  else _paired(forward(), reference(), paired, muted))
        try:
            for _ in passes:
                mx.eval([c.arrays() for c in collectors.values()])
                pool.clear()
        finally:
            model.update_modules(tree_unflatten([(p.path, p.module) for p in wanted]))
        owners = {k: getattr(c, "owner", None) or k for k, c in collectors.items()}
        owned = {k: c.stats() for k, c in collectors.items() if owners[k] == k}
        return {k: owned[owners[k]] for k in collectors}, owners

    def _run_collectors(self, model, wanted: list[LayerPlan],
                        collectors: dict[str, HessianCollector], forward) -> None:
        catchers = [(p.path, p.handler.catcher(p.module, collectors[p.path])) for p in wanted]
        model.update_modules(tree_unflatten(catchers))
        every = experts_parents(model, [p.path for p in wanted
                                        if getattr(p.handler, "calibrate_all_experts", False)])
        try:
            model.update_modules(tree_unflatten([(k, AllExpertsCalibration(m, k)) for k, m in every]))
            for _ in forward():
                mx.eval([c.arrays() for c in collectors.values()])
        finally:
            model.update_modules(tree_unflatten(every))
            model.update_modules(tree_unflatten([(p.path, p.module) for p in wanted]))

    def _quantize_experts(self, model, plans: list[LayerPlan], layout: ShardLayout, run_batch,
                          report, block_index, n_tokens: int):
        """Expert layers of one block: one Hessian per expert, a batch of experts per forward
        pass over the ``n_tokens`` calibration tokens, after the block's other layers are
        quantized (see quantkit.moe). Each expert's statistics go through the same shard tree
        as dense layers', and each rank solves its share of the experts, so the result does
        not depend on the number of processes."""
        def collect(active, collectors):
            merged = self.distributed.reduce_stats(layout, lambda positions: _expert_shard_stats(
                model, self, active, collectors, lambda: (run_batch(j) for j in positions)))
            for p in active:
                _load_expert_stats(collectors[p.path], p.path, merged)

        new_modules = []
        for p, module, records in quantize_expert_layers(
                plans, collect, self.fallback, n_tokens, self.distributed,
                _same_input(model, plans)):
            check_packed(p.path, dict(tree_flatten(module.parameters())), self.dtype)  # reliab
            for record in records:
                record.block = block_index
                report.add(record)
                self._emit("layer", record=record)
            new_modules.append((p.path, module))
        self._install(model, plans, new_modules)
        return new_modules

    def _install(self, model, plans: list[LayerPlan], new_modules: list[tuple[str, nn.Module]]):
        """Put the quantized layers in place: with dense stand-ins, copies of the original
        layers holding the dequantized weights until their block has run for the last time
        (see ``dense_standins`` and :meth:`_swap_standins`)."""
        installed = new_modules
        if self._final is not None:
            self._final.extend(new_modules)
            by_path = {p.path: p for p in plans}
            installed = [(k, _dense_standin(by_path[k].module, m, self._host))
                         for k, m in new_modules]
        if installed:
            model.update_modules(tree_unflatten(installed))

    def _swap_standins(self, model) -> None:
        """Replace the dense stand-ins installed so far by the quantized layers they stand for."""
        if self._final:
            model.update_modules(tree_unflatten(self._final))
            self._final.clear()

    def _collect_sharded(self, model, plans, layout: ShardLayout, run_batch, run_reference=None
                         ) -> dict[str, HessianStats]:
        """``_collect`` once per calibration shard of this rank (``run_batch(j)``: the forward
        pass of local batch ``j``); shard statistics combined across ranks in shard order."""
        if not any(p.needs_stats for p in plans):
            return {}
        merged = self.distributed.reduce_stats(layout, lambda positions: self._collect(
            model, plans, lambda: (run_batch(j) for j in positions),
            None if run_reference is None else lambda: (run_reference(j) for j in positions),
        )[0])
        return _share_identical(merged)

    def _collect_outside(self, model, blocks, block_paths, plans, batches, last_outputs, layout):
        replays = [_Replay(b, None) for b in blocks[:-1]] + [_Replay(blocks[-1], last_outputs)]
        model.update_modules(tree_unflatten(list(zip(block_paths, replays))))
        # The output head's outputs (logits) are not needed: MLX, lazy, never computes them.
        self._runners.clear()
        self._host_forward = False
        try:
            return self._collect_sharded(model, plans, layout, lambda j: model(batches[j]))
        finally:
            self._host_forward = True
            model.update_modules(tree_unflatten(list(zip(block_paths, blocks))))

    def _quantize_all(self, model, plans, stats, report, block_index) -> list[tuple[str, nn.Module]]:
        """Quantize this rank's share of ``plans``; every rank installs all of them."""
        owners = dict(zip([p.path for p in plans],
                          self.distributed.share([layer_cost(p) for p in plans]), strict=True))
        rank = self.distributed.rank
        done = {}
        for group in _solve_groups(plans, stats):
            for p in group[1:]:  # a joint solve is one rank's work
                owners[p.path] = owners[group[0].path]
            if owners[group[0].path] != rank:
                for p in group:
                    stats.pop(p.path, None)
                continue
            results, joint_s = self._solve_jointly(group, stats)
            for p, result in zip(group, results, strict=True):
                module, record = self.quantize_layer(p, stats.pop(p.path, None), result)
                record.time_s += joint_s / len(group)
                record.block, record.rank = block_index, rank
                done[p.path] = (module, record)
        done = self._exchange_layers(plans, done, owners)
        new_modules = []
        for p in plans:
            module, record = done[p.path]
            report.add(record)
            self._emit("layer", record=record)
            new_modules.append((p.path, module))
        self._install(model, plans, new_modules)
        return new_modules

    def _exchange_layers(self, plans: list[LayerPlan], done: dict[str, tuple[nn.Module, LayerRecord]],
                         owners: dict[str, int]) -> dict[str, tuple[nn.Module, LayerRecord]]:
        """Every rank's quantized layers on every rank: ``done`` holds this rank's own."""
        group = self.distributed
        if group.size == 1:
            return done
        mine = [({"path": p.path, "record": attrs.asdict(done[p.path][1])},
                 tree_flatten(done[p.path][0].parameters()))
                for p in plans if owners[p.path] == group.rank]
        by_path = {p.path: p for p in plans}
        out = dict(done)
        for r, items in enumerate(group.exchange(mine, "exchanging quantized layers")):
            if r == group.rank:
                continue
            for meta, params in items:
                p = by_path[meta["path"]]
                module = p.handler.build(p.module, {k: v for k, v in params if "." not in k}, p.spec)
                nested = [(k, v) for k, v in params if "." in k]
                if nested:
                    module.update(tree_unflatten(nested))
                mx.eval(module.parameters())
                out[p.path] = (module, LayerRecord(**meta["record"]))
        return out

    def _resume(self, model, plans: dict[str, LayerPlan], report: RunReport,
                checkpoint: Checkpoint | None, n_blocks: int) -> ResumeState | None:
        """The finished blocks ``checkpoint`` holds (their records go into ``report``)."""
        state = checkpoint.load() if checkpoint is not None else None
        if state is None:
            return None
        if state.next_block > n_blocks:
            raise CheckpointError(f"checkpoint holds {state.next_block} blocks, the model has {n_blocks}")
        for record in state.records:
            report.add(record)
        self._emit("resume", index=state.next_block - 1, total=n_blocks)
        return state

    @staticmethod
    def _solve_jointly(group: list[LayerPlan], stats) -> tuple[list[QuantResult | None], float]:
        """Layers sharing one Hessian, spec and row-independent quantizer are solved as one
        matrix (their rows stacked): one factorization, one pass of the column loop. Returns
        ``[None] * len(group)`` (solve each on its own) when that does not apply or fails."""
        if len(group) == 1:
            return [None], 0.0
        t0 = time.perf_counter()
        p0 = group[0]
        weights = [p.handler.weight(p.module).astype(mx.float32) for p in group]
        try:
            joint = p0.quantizer.quantize(mx.concatenate(weights, axis=0), p0.spec,
                                          stats[p0.path], p0.storage_dtype)
        except FactorizationError:
            return [None] * len(group), 0.0
        results = []
        start = 0
        for w in weights:
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            results.append(attrs.evolve(
                joint,
                dequantized=joint.dequantized[rows],
                codes=None if joint.codes is None else joint.codes[rows],
                scales=None if joint.scales is None else joint.scales[rows],
                biases=None if joint.biases is None else joint.biases[rows],
                packed=None if joint.packed is None else {k: v[rows] for k, v in joint.packed.items()},
                info=dict(joint.info, joint_with=[p.path for p in group]),
            ))
        return results, time.perf_counter() - t0

    def quantize_layer(
        self, p: LayerPlan, stats: HessianStats | None, result: QuantResult | None = None
    ) -> tuple[nn.Module, LayerRecord]:
        """Quantize one planned layer; fall back to ``self.fallback`` when its strategy cannot
        run (no calibration tokens, Hessian not factorizable, no per-expert support).
        ``result``: the layer's values when they were already computed (a joint solve)."""
        t0 = time.perf_counter()
        weight = p.handler.weight(p.module)  # made float32 a slice of rows at a time
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
        chunks = None if result is None else iter([(slice(0, weight.shape[0]), result)])
        if fallback_reason is None and chunks is None:
            try:
                chunks = _started(p.quantizer.quantize_chunks(weight, p.spec, stats, p.storage_dtype))
            except FactorizationError as exc:
                fallback_reason = str(exc)
        if chunks is None:
            chunks = self.fallback.quantize_chunks(weight, p.spec, stats, p.storage_dtype)
            record.status = "fallback"
            record.strategy = self.fallback.name
            record.reason = "; ".join(r for r in (p.note, fallback_reason) if r)
        # Each slice of rows is measured and packed, then dropped: only the packed layer is
        # kept whole (see Quantizer.quantize_chunks).
        measure = stats is not None and stats.n_tokens > 0 and weight.ndim == 2
        packer = packer_for(p.spec.mode)
        pack_dtype = mx.float32 if p.spec.mode == "affine" else p.storage_dtype
        figures, parts = np.zeros(3), []
        for rows, part in chunks:
            record.damping = part.info.get("damping")
            if measure:
                figures += hessian_figures(weight[rows], part.dequantized, stats.h, p.spec,
                                           p.storage_dtype)
            parts.append(packer.pack(part, pack_dtype))
            mx.eval(parts[-1])
            del part
        if measure:
            e, energy, rtn = (float(v) for v in figures)
            record.hessian_error, record.rtn_hessian_error = e, rtn
            record.relative_error = e / energy if energy > 0 else 0.0
        packed = parts[0] if len(parts) == 1 else {
            k: mx.concatenate([q[k] for q in parts]) for k in parts[0]}
        check_packed(p.path, packed, self.dtype)  # reliab: no Inf/NaN written
        module = p.handler.build(p.module, packed, p.spec)
        mx.eval(module.parameters())
        record.time_s = time.perf_counter() - t0
        return module, record

    def _config(self, report: RunReport) -> dict[str, Any]:
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
    check("forward")  # reliab: a place to stop at every calibration batch
    return block(inputs[j], *args[j][0], **args[j][1])


def _rebind(model: nn.Module, plans: list[LayerPlan]) -> None:
    """Point ``plans`` at the model's current layers (a transform may have swapped some)."""
    current = dict(model.named_modules())
    for p in plans:
        p.module = current[p.path]


def _float_params_from_file(model: nn.Module, plans: list[LayerPlan], path, prefix: str,
                            dtype: mx.Dtype | None) -> None:
    """Put the parameters of a finished block's file that are not quantized layers' into the
    model, in the calibration ``dtype`` (exactly the values the run used, unless a block
    transform changed them in a dtype the output rounds)."""
    quantized = tuple(p.path + "." for p in plans)
    updates = []
    for name, value in mx.load(str(path)).items():
        if not name.startswith(prefix + ".") or name.startswith(quantized):
            continue
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        updates.append((name, value))
    if updates:
        model.update(tree_unflatten(updates))


def _from_file(plans: list[LayerPlan], path) -> list[tuple[str, nn.Module]]:
    """The quantized layers of ``plans`` rebuilt from a finished block's file, their scales and
    biases in the dtype the walk packs them in (float32 for affine: exact, the stored values
    were rounded to the stored dtype when they were computed)."""
    arrays = mx.load(str(path))
    out = []
    for p in plans:
        dtype = mx.float32 if p.spec.mode == "affine" else p.storage_dtype
        packed = {}
        for key in ("weight", "scales", "biases"):
            value = arrays.get(f"{p.path}.{key}")
            if value is None:
                continue
            if key != "weight" and value.dtype != mx.uint8 and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            packed[key] = value
        if "scales" not in packed:
            raise CheckpointError(f"checkpoint file {path} does not hold the quantized layer {p.path}")
        out.append((p.path, p.handler.build(p.module, packed, p.spec)))
    return out


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
        routed_counts = getattr(c, "routed", None)
        if getattr(c, "all_experts", False) and routed_counts is not None:
            # the rows the router sent, beside the all-experts rows
            routed = int(mx.sum(routed_counts).item())
            out[f"{path}#routed"] = HessianStats(
                h=routed_counts.astype(mx.float32) / max(routed, 1), n_tokens=routed)
        h_all = getattr(c, "h_all", None)
        if h_all is not None:  # Hessian shrinkage: the layer's Hessian over all routed rows
            out[f"{path}#all"] = HessianStats(h=h_all, n_tokens=rows)
        if c.shared:
            out[f"{path}#shared"] = HessianStats(h=c.h[0], n_tokens=rows)
            continue
        for i, e in enumerate(c.experts):
            out[f"{path}#{e}"] = HessianStats(h=c.h[i], n_tokens=int(c.counts[e].item()))
    return out


def _same_input(model: nn.Module, plans: list[LayerPlan]) -> dict[str, str]:
    """``{layer: layer it reads the very same input of}`` among ``plans``, from the model's
    architecture table (e.g. a ``SwitchGLU``'s up projection: its gate projection), where both
    have equal handlers: their Hessians are the same (see :func:`quantize_expert_layers`)."""
    by_path = {p.path: p for p in plans}
    return {path: lead for path, lead in shared_input_groups(model, by_path).items()
            if by_path[lead].handler == by_path[path].handler}


def _load_expert_stats(collector, path: str, merged: dict[str, HessianStats]) -> None:
    """Put the merged statistics back into ``collector`` (its Hessians and token counts)."""
    total = merged[f"{path}#counts"]
    collector.counts = mx.round(total.h * total.n_tokens).astype(mx.int32)
    if f"{path}#routed" in merged:
        routed = merged[f"{path}#routed"]
        collector.routed = mx.round(routed.h * routed.n_tokens).astype(mx.int32)
    if f"{path}#all" in merged:
        cast(Any, collector).h_all = merged[f"{path}#all"].h
    if collector.shared:
        collector.h = merged[f"{path}#shared"].h[None]
    else:
        collector.h = mx.stack([merged[f"{path}#{e}"].h for e in collector.experts])


def _share_identical(stats: dict[str, HessianStats]) -> dict[str, HessianStats]:
    """One object for layers whose statistics are bit for bit the same (layers reading the
    same input: q/k/v, gate/up), so they can be solved jointly. Decided from the merged values,
    the same whatever the number of processes."""
    out: dict[str, HessianStats] = {}
    canonical: list[HessianStats] = []
    for path, st in stats.items():
        for c in canonical:
            if (c.n_tokens == st.n_tokens and c.h.shape == st.h.shape
                    and (c is st or mx.array_equal(c.h, st.h).item())):
                out[path] = c
                break
        else:
            canonical.append(st)
            out[path] = st
    return out


def _started(chunks: Iterator[tuple[slice, QuantResult]]) -> Iterator[tuple[slice, QuantResult]]:
    """``chunks`` with its first item already computed, so that a failure to start (e.g. a
    :class:`FactorizationError` while factorizing) is raised here."""
    first = next(chunks)
    return itertools.chain([first], chunks)


def _dense_standin(original: nn.Module, quantized: nn.Module, host: bool = False) -> nn.Module:
    """A copy of ``original`` holding the weights ``quantized`` computes with (dequantized);
    ``original`` itself is left as it was (and not referenced, so it can be freed). ``host``: run
    by a :class:`HostLinear` where it can be."""
    w = mx.dequantize(
        quantized["weight"], quantized["scales"], quantized.get("biases"),
        group_size=quantized.group_size, bits=quantized.bits, mode=quantized.mode,
    )
    standin = copy.copy(original)
    standin.weight = w.astype(original.weight.dtype)
    mx.eval(standin.weight)
    return HostLinear(standin) if host and runs_on_host(standin) else standin


class _InputPool:
    """The input arrays seen by collectors during one forward pass, by identity."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[mx.array, str]] = {}

    def owner(self, x: mx.array, path: str) -> str:
        """The path of the first collector that saw this very array in this pass (``path``
        itself when none did)."""
        hit = self._seen.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        self._seen[id(x)] = (x, path)
        return path

    def clear(self) -> None:
        self._seen.clear()


class _SharingCollector(HessianCollector):
    """Feeds ``inner`` only with inputs no other collector of the pool saw first; a layer whose
    inputs are always another layer's (``owner``) gets that layer's statistics."""

    def __init__(self, path: str, inner: HessianCollector, pool: _InputPool) -> None:
        self.path = path
        self.inner = inner
        self.pool = pool
        self.owner: str | None = None  # None until the first input; then the path that owns them
        self.muted = False  # set while a full-precision reference pass runs (GPTAQ)

    def update(self, x: mx.array) -> None:
        if self.muted:
            return
        owner = self.pool.owner(x, self.path)
        if self.owner is None:
            self.owner = owner
        elif owner != self.owner:
            raise RuntimeError(
                f"{self.path}: inputs shared with {self.owner} in one pass but not in another"
            )
        if owner == self.path:
            self.inner.update(x)

    def stats(self) -> HessianStats:
        return self.inner.stats()

    def arrays(self) -> list[mx.array]:
        return self.inner.arrays() if self.owner in (None, self.path) else []


def _solve_groups(plans: list[LayerPlan], stats: dict[str, HessianStats]) -> list[list[LayerPlan]]:
    """Plans in order, layers that can be solved as one matrix put together: same Hessian
    object, spec, scale dtype and (row-independent) quantizer, 2-D weights."""
    groups: dict[tuple, list[LayerPlan]] = {}
    order: list[list[LayerPlan]] = []
    for p in plans:
        st = stats.get(p.path)
        joinable = (
            st is not None and st.n_tokens > 0 and p.needs_stats
            and getattr(p.quantizer, "rows_independent", False)
            and p.handler.weight(p.module).ndim == 2
        )
        if not joinable:
            order.append([p])
            continue
        key = (id(st), p.spec, p.quantizer, p.storage_dtype)
        if key in groups:
            groups[key].append(p)
        else:
            groups[key] = [p]
            order.append(groups[key])
    return order


def _paired(passes, references, collectors, muted=()):
    """Each reference pass (``collectors`` recording, ``muted`` ignoring their inputs) followed
    by its batch's pass."""
    passes, references = iter(passes), iter(references)
    while True:
        for c in collectors:
            c.recording = True
        for c in muted:
            c.muted = True
        try:
            done = next(references, None) is None
        finally:
            for c in collectors:
                c.recording = False
            for c in muted:
                c.muted = False
        if done:
            return
        yield next(passes)


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return decoder_blocks(model)


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
