"""ModelWalker: sequential, block-by-block calibration and quantization of an mlx-lm model.

For each decoder block: run the block's current inputs through it with collectors on the layers
that need statistics; quantize those layers (dropping each Hessian once used); run the now
quantized block to produce the next block's inputs. Layers outside the blocks (output head,
tied embedding) are done last, from the final block's outputs.

The walker is configuration and wiring: nothing on it changes during a run. What a run changes
as it goes is a :class:`WalkState` that :meth:`ModelWalker.run` makes; what changes from block
to block is a :class:`~quantkit.pipeline.collect.BlockPasses`. The stages are in
:mod:`quantkit.pipeline`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableSequence, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .arch import ArchSpec, arch_for, arch_of, decoder_blocks
from .blocks.base import BlockContext
from .checkpoint import Checkpoint, ResumeState
from .distributed import Distributed, ShardLayout
from .errors import CheckpointError, FactorizationError, ModelLoadError, RecipeError
from .hessian import HessianStats
from .host import BACKENDS, host_attention, resolve_backend, reusing_buffers, row_slices_exact
from .interrupt import check
from .inverse import InverseFactor
from .pipeline import build
from .pipeline.activations import ParkedLayers, activation_store
from .pipeline.calibrate import block_forward, capture, replaying
from .pipeline.collect import BlockPasses, Runners, collect_sharded, row_chunks
from .pipeline.distill import distill
from .pipeline.dtypes import DTYPES, restore_dtypes
from .pipeline.expert_layers import collect_experts, quantize_expert_layers, same_input
from .pipeline.head import FloatLogits, Head, as_linear_pair, head_inputs, regroup, write_back
from .pipeline.hooks import Progress, WalkHook
from .pipeline.install import StandIns, release_float
from .pipeline.plan import LayerPlan, layer_cost, plan_layers, quantization_config, rebind
from .pipeline.shards import final_arrays, float_params_from_file, reload_lazily
from .pipeline.solve import (
    exchange_layers,
    factor_groups,
    quantize_layer,
    solve_groups,
    solve_jointly,
)
from .quantizers import Quantizer, QuantResult, RTNQuantizer
from .recipe import Recipe
from .registry import DEFAULT_REGISTRY, LayerRegistry
from .report import LayerRecord, RunReport
from .validate import check_packed, check_rules, plan_winners


def _hook_tuple(hooks: Iterable[WalkHook]) -> tuple[WalkHook, ...]:
    return tuple(hooks)


@attrs.define
class WalkResult:
    model: nn.Module
    quantization: dict[str, Any]
    report: RunReport


@attrs.define
class WalkState:
    """What one walk changes as it goes (made by :meth:`ModelWalker.run`, dropped at its end).

    ``host``: the calibration's dense arithmetic runs on the NumPy backend; ``store``: makes
    the sequences a block's calibration activations are kept in (files on the host, see
    :func:`~quantkit.pipeline.activations.activation_store`); ``standins``: installs each
    block's quantized layers (as dense stand-ins until the block has run for the last time);
    ``phases``: wall time per phase, for the report."""

    host: bool
    store: Callable[..., MutableSequence[mx.array]]
    standins: StandIns
    phases: dict[str, float] = attrs.field(factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to phase ``name`` of the report. Forward
        passes (``calibrate``, ``resume``) on the NumPy backend reuse its work buffers batch
        after batch (:func:`~quantkit.host.reusing_buffers`), dropped when the phase ends."""
        t0 = time.perf_counter()
        passes = self.host and name in ("calibrate", "resume")
        try:
            with reusing_buffers() if passes else contextlib.nullcontext():
                yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


@attrs.frozen
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
    #: Code following the walk layer by layer (:class:`~quantkit.pipeline.hooks.WalkHook`),
    #: e.g. the mixed-precision profiler (:func:`quantkit.mixed.measure_sensitivity`).
    hooks: tuple[WalkHook, ...] = attrs.field(default=(), converter=_hook_tuple)
    #: ``registry`` with the recipe's ``[moe]`` options (e.g. calibrate_all_experts) on the
    #: expert handler: the registry the walk plans with.
    layer_registry: LayerRegistry = attrs.field(init=False, repr=False, default=attrs.Factory(
        lambda self: self.recipe.layer_registry(self.registry), takes_self=True))

    def _emit(self, event: str, **info: Any) -> None:
        check(event)  # reliab: every progress event is a place to stop (quantkit.interrupt)
        if self.progress is not None:
            self.progress(event, info)

    # -- planning ---------------------------------------------------------------------------

    def plan(self, model: nn.Module, report: RunReport | None = None) -> dict[str, LayerPlan]:
        """Decide, for every leaf module, what happens to it (:func:`quantkit.pipeline.plan.plan_layers`).
        Skipped layers go to ``report``; then every hook sees the plans."""
        plans = plan_layers(model, self.recipe, self.layer_registry, report,
                            use_model_predicate=self.use_model_predicate)
        for hook in self.hooks:
            hook.planned(plans)
        return plans

    # -- the walk ---------------------------------------------------------------------------

    def run(self, model: nn.Module, tokens: mx.array,
            checkpoint: Checkpoint | None = None) -> WalkResult:
        """Quantize ``model`` in place using calibration ``tokens (num_samples, seq_len)``.

        With a ``checkpoint``, the state after each decoder block is saved to it, and a run
        finds there the blocks a previous (interrupted) run finished and continues after them."""
        host = resolve_backend(self.backend) == "numpy"
        with (host_attention(model) if host else contextlib.nullcontext(),
              activation_store(host) as store):
            return self._run(model, tokens, checkpoint, host, store)

    def _run(self, model: nn.Module, tokens: mx.array, checkpoint: Checkpoint | None, host: bool,
             store: Callable[..., MutableSequence[mx.array]]) -> WalkResult:
        start = time.perf_counter()
        report = RunReport()
        plans = self.plan(model, report)
        if not plans:
            why = report.layers[0].reason if report.layers else "it has no layer with a registered handler"
            raise RecipeError(f"no layer of this model can be quantized ({why}); change the recipe or group size")
        check_rules(self.recipe, plan_winners(plans, report.layers))  # reliab: no silent no-op rule
        orig_dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
        if self.dtype is not None:
            model.set_dtype(DTYPES[self.dtype])

        blocks = decoder_blocks(model)
        row_wise = arch_of(model).row_wise if host and row_slices_exact() else ()
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
        state = WalkState(host=host, store=store,
                          standins=StandIns(on=standins and needs_calibration, host=host))
        # End-to-end distillation after the walk needs the float model's final hidden states:
        # the float model's activations are carried through the blocks for it.
        distilling = getattr(self.recipe, "distill", None) is not None
        if needs_calibration or distilling:
            with state.phase("calibrate"):
                captured, block_args = capture(model, blocks, block_paths, batches, lambda b: self._emit(
                    "capture", index=b, total=len(batches)))
                # Parked on the host: one batch resident at a time (see pipeline/activations.py).
                inputs = state.store(captured)
                del captured
        # Full-precision block inputs, for strategies that compare them with the quantized ones.
        transforms = tuple(getattr(self.recipe, "transforms", ()) or ())
        optimizers = tuple(getattr(self.recipe, "optimizers", ()) or ())
        float_model_targets = any(getattr(o, "target", None) == "float_model" for o in optimizers)
        ref_inputs = state.store(list(inputs)) if (needs_calibration or distilling) and (
            float_model_targets or distilling or any(p.quantizer.needs_reference for p in plans.values())) else None
        block_files: list[Path | None] = [None] * len(blocks)  # where each finished block went
        if ref_inputs is not None and any(p.quantizer.needs_reference for p in plans.values()) \
                and (self.distributed.size > 1 or resumed is not None):
            raise RecipeError("strategies that need full-precision inputs (gptaq) run in one "
                              "process without --resume; use gptq for distributed or resumed runs")
        if (transforms or optimizers) and not needs_calibration:
            raise RecipeError("block transforms and optimizers need calibration data; use a "
                              "strategy that calibrates (e.g. gptq), not only rtn")
        for i, (block, bpath) in enumerate(zip(blocks, block_paths)):
            # Plans are dropped once their block is done: with them go the original layers.
            inside = [plans.pop(k) for k in list(plans) if k.startswith(bpath + ".")]
            # Made anew for each block: its NumPy runners, its tail cut, its row-wise modules.
            passes = BlockPasses(host=host, runners=Runners(host),
                                 row_wise=tuple(f"{bpath}.{r}" for r in row_wise))
            if resumed is not None and i < resumed.next_block:
                # A finished block: its quantized layers come from its file, and it computes
                # the next block's inputs exactly as it did in the run that wrote it.
                with state.phase("resume"):
                    if ref_inputs is not None:  # the float model's activations, as in that run
                        previous = ref_inputs
                        ref_inputs = state.store(self._eval(block(x, *a, **kw))
                                                 for x, (a, kw) in zip(ref_inputs, block_args[i]))
                        del previous[:]
                    # Its other parameters (norms, kept layers) come from the file too: block
                    # transforms may have changed them.
                    float_params_from_file(model, [p.path for p in inside], resumed.files[i], bpath,
                                           DTYPES.get(self.dtype or ""))
                    state.standins.install(model, inside, build.from_file(inside, resumed.files[i]))
                    if needs_calibration:
                        inputs = self._advance(model, block, inputs, block_args[i], passes.row_wise)
                    state.standins.swap(model)
                    reload_lazily(model, resumed.files[i])
                    block_files[i] = resumed.files[i]
                continue
            self._emit("block", index=i, total=len(blocks), path=bpath)
            ctx = None
            if transforms or optimizers:
                ctx = self._context(model, i, bpath, block, inputs, block_args[i], state.store)
            for t in transforms:  # before statistics: they see the transformed weights
                self._record_method(report, i, "transform", t, t.apply(ctx))
                rebind(model, inside)
            targets = None
            if optimizers:  # the float block's outputs, before its layers are replaced
                with state.phase("calibrate"):
                    # Parked on the host like the inputs: one batch resident at a time.
                    source = ref_inputs if float_model_targets else inputs
                    assert source is not None
                    targets = state.store()
                    for j, (a, kw) in enumerate(block_args[i]):
                        targets.append(self._eval(block(source[j], *a, **kw)))
            # The float model's activations move on to the next block's: with float-model
            # targets, they are the targets; else before the block's statistics are held (in
            # place, a row slice at a time where exact), unless a strategy compares its inputs
            # with them while collecting (gptaq).
            compares = any(p.quantizer.needs_reference for p in inside)
            if ref_inputs is not None and not compares:
                with state.phase("calibrate"):
                    if float_model_targets:
                        del ref_inputs[:]  # (their scratch files on the host)
                        ref_inputs = targets
                    else:
                        ref_inputs = self._advance(model, block, ref_inputs, block_args[i], passes.row_wise)
            with state.phase("calibrate"):
                stats = collect_sharded(
                    model, inside, self.distributed, layout,
                    partial(block_forward, block, inputs, block_args[i]), passes,
                    partial(block_forward, block, ref_inputs, block_args[i]) if compares else None,
                    tail_cut=True,
                ) if needs_calibration else {}
                if ref_inputs is not None and compares:
                    previous = ref_inputs
                    ref_inputs = targets if float_model_targets else state.store(
                        self._eval(block(x, *a, **kw)) for x, (a, kw) in zip(ref_inputs, block_args[i]))
                    del previous[:]  # (their scratch files on the host)
            # The NumPy runners hold the block's float weights: not needed once collected.
            passes.runners.clear()
            with state.phase("solve"):
                # Each float layer is dropped once quantized, unless hooks read a plan's float
                # layer after the walk (kept for them). Block optimizers read the float layers
                # after the solve: each is parked (scratch files on the host) once its
                # quantized layer is made.
                release = not any(getattr(h, "keeps_float_layers", True) for h in self.hooks)
                parked = ParkedLayers(state.store(), bpath + ".") if optimizers and release else None
                done = self._quantize_all(model, [p for p in inside if not p.per_expert], stats, report, i,
                                          host=host, standins=state.standins,
                                          release=release, parked=parked)
                experts = [p for p in inside if p.per_expert]
                if experts:
                    done += self._quantize_experts(
                        model, experts, layout, partial(block_forward, block, inputs, block_args[i]),
                        report, i, tokens.size, state.standins,
                    )
            if optimizers:
                assert ctx is not None
                float_layers: Mapping[str, nn.Module]
                if parked is not None:
                    for p in inside:  # those another process solved, and expert layers
                        if p.path[len(bpath) + 1:] not in parked:
                            p.module = parked.park(p.path, p.module)
                    float_layers = parked
                else:
                    float_layers = {p.path[len(bpath) + 1:]: p.module for p in inside}
                with state.phase("optimize"):
                    self._optimize(model, report, attrs.evolve(ctx, float_layers=float_layers),
                                   inside, optimizers, targets, state.standins)
                if targets is not ref_inputs:
                    del targets[:]  # (their scratch files on the host)
                del targets, float_layers
                if parked is not None:
                    parked.close()
            parked = None
            # Its plans hold the block's original float layers, its context the activations:
            # neither is needed for the last forward pass, which they would double.
            inside, ctx = [], None
            if needs_calibration:
                with state.phase("calibrate"):
                    inputs = self._advance(model, block, inputs, block_args[i], passes.row_wise)
            # The block has produced the next block's inputs and never runs again (the layers
            # outside the blocks are calibrated from the last block's stored outputs): its
            # quantized layers replace its dense stand-ins now, so at most one block's
            # stand-ins are ever held.
            state.standins.swap(model)
            passes.runners.clear()
            del done
            if checkpoint is not None:
                # Written out, the block's arrays become lazy loads of its file: the memory a
                # run holds does not grow with the number of blocks.
                with state.phase("write"):
                    path = checkpoint.save(i, final_arrays(block, bpath, orig_dtypes),
                                           [r for r in report.layers if r.block == i])
                    reload_lazily(model, path)
                    block_files[i] = path

        del inside  # the last block's plans
        outside = list(plans.values())  # what is left: layers outside the decoder blocks
        stats = {}
        if needs_calibration and any(p.needs_stats for p in outside):
            with state.phase("calibrate"):
                stats = self._collect_outside(model, blocks, block_paths, outside, batches, inputs,
                                              layout, host)
        with state.phase("solve"):
            # The blocks are done: these layers go in as they are (no stand-ins).
            self._quantize_all(model, outside, stats, report, None, host=host, standins=StandIns())
        head_optimizers = [o for o in optimizers if getattr(o, "head", False)]
        if head_optimizers and needs_calibration and outside:
            with state.phase("optimize"):
                self._optimize_head(model, blocks, block_paths, outside, batches, inputs,
                                    ref_inputs, head_optimizers, report, state.store)
        restore_dtypes(model, orig_dtypes)
        if distilling:
            assert ref_inputs is not None
            with state.phase("distill"):
                self._distill(model, tokens, blocks, block_paths, outside, batches, ref_inputs,
                              block_files, layout, report, state.store)
            del ref_inputs[:]
        quantization = self._config(report)
        report.time_s = time.perf_counter() - start
        report.world_size = self.distributed.size
        report.phases = dict(state.phases)
        report.settings = {"recipe": self.recipe.to_dict(), "num_samples": int(tokens.shape[0]),
                           "seq_len": int(tokens.shape[1]), "calibration_dtype": self.dtype}
        try:
            report.peak_memory_gb = mx.get_peak_memory() / 1e9
        except AttributeError:  # older MLX
            report.peak_memory_gb = None
        return WalkResult(model=model, quantization=quantization, report=report)

    # -- block methods ----------------------------------------------------------------------

    def _context(self, model, index: int, path: str, block, inputs, args,
                 store: Callable[..., MutableSequence[mx.array]]) -> BlockContext:
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
            store=store,
        )

    def _optimize_head(self, model, blocks, block_paths, outside: list[LayerPlan], batches,
                       last_outputs, float_outputs, optimizers, report: RunReport,
                       store: Callable[..., MutableSequence[mx.array]]) -> None:
        """Run ``optimizers`` on the output head as one more block (quantkit.pipeline.head):
        inputs the quantized model's final hidden states, targets the float head's logits on the
        float model's (``float_outputs``: the last block's float outputs; ``None``: the same
        inputs)."""
        current = dict(model.named_modules())
        candidates = {p.path: (current[p.path], p.handler.catcher) for p in outside}

        def inputs_from(outputs):
            with replaying(model, blocks, block_paths, outputs):
                return head_inputs(model, candidates, lambda j: model(batches[j]), len(batches))

        found = inputs_from(last_outputs)
        if found is None:
            return
        path, xq = found
        plan = next(p for p in outside if p.path == path)
        pair = as_linear_pair(plan.module, current[path])
        if pair is None:
            return
        flt, linear = pair
        size = max((o.batch_size or 1) for o in optimizers)
        xq = store(regroup(xq, size))
        xf = xq if float_outputs is None else store(regroup(inputs_from(float_outputs)[1], size))
        model_type = getattr(model, "model_type", None) or getattr(
            getattr(model, "args", None), "model_type", "unknown")
        ctx = BlockContext(
            index=len(blocks), path=path, block=Head(linear), inputs=xq,
            forward=lambda module, j: module(xq[j]), arch=ArchSpec(model_types=(model_type,)),
            reduce=self.distributed.sum, float_layers={"head": flt}, seed=len(blocks),
            spec=self.recipe.default.spec, objective="kl",
        )
        self._emit("block", index=len(blocks), total=len(blocks), path=path)
        for o in optimizers:
            self._record_method(report, len(blocks), "optimizer", o,
                                o.optimize(ctx, FloatLogits(flt, xf)))
        write_back(current[path], linear)

    def _distill(self, model, tokens: mx.array, blocks, block_paths, outside: list[LayerPlan],
                 batches, float_outputs: Sequence[mx.array], files: list[Path | None],
                 layout: ShardLayout, report: RunReport,
                 store: Callable[..., MutableSequence[mx.array]]) -> None:
        """End-to-end distillation (:mod:`quantkit.pipeline.distill`): the teacher's logits are
        the float model's layers after the blocks (final norm, float head) on the float model's
        final hidden states ``float_outputs`` (this process's batches)."""
        assert self.recipe.distill is not None
        rows = {g * self.batch_size + r: (k, r) for k, g in enumerate(layout.local_batches)
                for r in range(batches[k].shape[0])}
        floats = [(p.path, p.module) for p in outside]

        def teacher(idx: list[int]) -> mx.array:
            held_batches = {k: float_outputs[k] for k in {rows[j][0] for j in idx}}  # each read once
            h = mx.concatenate([held_batches[rows[j][0]][rows[j][1] : rows[j][1] + 1, :-1]
                                for j in idx])
            current = dict(model.named_modules())
            held = [(p, current[p]) for p, _ in floats]
            model.update_modules(tree_unflatten(floats))
            try:
                with replaying(model, blocks, block_paths, [h]):
                    return model(tokens[mx.array(idx), :-1])
            finally:
                model.update_modules(tree_unflatten(held))

        done = distill(model, teacher, tokens, self.recipe.distill,
                       lambda event, info: self._emit(event, **info), files=files,
                       held=set(rows), reduce=self.distributed.sum if self.distributed.size > 1 else None,
                       store=store)
        report.block_methods.append({"block": None, "kind": "distill", "name": "distill",
                                     "figures": done.to_dict()})

    def _record_method(self, report: RunReport, index: int, kind: str, method, figures) -> None:
        entry = {"block": index, "kind": kind, "name": getattr(method, "name", type(method).__name__),
                 "figures": dict(figures or {})}
        report.block_methods.append(entry)
        self._emit(kind, **entry)

    def _optimize(self, model, report: RunReport, ctx: BlockContext, inside: list[LayerPlan],
                  optimizers, targets, standins: StandIns) -> None:
        """Run the optimizers on the block's quantized layers (dense stand-ins put aside), then
        put stand-ins of the optimized layers back for the block's last forward pass."""
        standins.swap(model)
        for o in optimizers:
            self._record_method(report, ctx.index, "optimizer", o, o.optimize(ctx, targets))
        if standins.on:
            current = dict(model.named_modules())
            standins.install(model, inside, [(p.path, current[p.path]) for p in inside])

    # -- forward passes ---------------------------------------------------------------------

    @staticmethod
    def _eval(x: mx.array) -> mx.array:
        mx.eval(x)
        return x

    def _advance(self, model, block, inputs: MutableSequence[mx.array], args,
                 row_wise: tuple[str, ...]) -> MutableSequence[mx.array]:
        """``block``'s outputs on ``inputs``, computed batch by batch in place of them: one
        batch's old and new activations are held at a time, not all of them. (A plain list is
        copied first: a block method may have kept the one it was shown.) The block's
        ``row_wise`` modules run a slice of rows at a time where they can
        (:func:`~quantkit.pipeline.collect.row_chunks`)."""
        if isinstance(inputs, list):
            inputs = list(inputs)
        with row_chunks(model, row_wise):
            for j, (a, kw) in enumerate(args):
                inputs[j] = self._eval(block(inputs[j], *a, **kw))
        return inputs

    def _collect_outside(self, model, blocks, block_paths, plans, batches, last_outputs,
                         layout: ShardLayout, host: bool) -> dict[str, HessianStats]:
        """Statistics of the layers outside the blocks (the output head): the blocks replay
        their stored outputs; the layers run as they are (no NumPy runners)."""
        # The output head's outputs (logits) are not needed: MLX, lazy, never computes them.
        with replaying(model, blocks, block_paths, last_outputs):
            return collect_sharded(model, plans, self.distributed, layout, lambda j: model(batches[j]),
                                   BlockPasses(host=host, runners=Runners(host=False)))

    # -- solving ----------------------------------------------------------------------------

    def _quantize_experts(self, model, plans: list[LayerPlan], layout: ShardLayout, run_batch,
                          report, block_index, n_tokens: int, standins: StandIns):
        """Expert layers of one block: one Hessian per expert, a batch of experts per forward
        pass over the ``n_tokens`` calibration tokens, after the block's other layers are
        quantized (see :mod:`quantkit.pipeline.expert_layers`). Each expert's statistics go through the same shard tree
        as dense layers', and each rank solves its share of the experts, so the result does
        not depend on the number of processes."""
        collect = collect_experts(model, self.distributed, layout, run_batch)
        new_modules = []
        for p, module, records in quantize_expert_layers(
                plans, collect, self.fallback, n_tokens, self.distributed,
                same_input(model, plans)):
            check_packed(p.path, dict(tree_flatten(module.parameters())), self.dtype)  # reliab
            for record in records:
                record.block = block_index
                report.add(record)
                self._emit("layer", record=record)
            new_modules.append((p.path, module))
        standins.install(model, plans, new_modules)
        return new_modules

    def _quantize_all(self, model, plans, stats, report, block_index, *, host: bool,
                      standins: StandIns, release: bool = False,
                      parked: ParkedLayers | None = None) -> list[tuple[str, nn.Module]]:
        """Quantize this rank's share of ``plans``; every rank installs all of them (through
        ``standins``). ``release``: drop each float layer once quantized
        (:func:`~quantkit.pipeline.install.release_float`; into ``parked`` when given)."""
        owners = dict(zip([p.path for p in plans],
                          self.distributed.share([layer_cost(p) for p in plans]), strict=True))
        rank = self.distributed.rank
        done = {}
        mine = []
        for group in solve_groups(plans, stats):
            for p in group[1:]:  # a joint solve is one rank's work
                owners[p.path] = owners[group[0].path]
            if owners[group[0].path] != rank:
                for p in group:
                    stats.pop(p.path, None)
                continue
            mine.append(group)
        t0 = time.perf_counter()
        factors = factor_groups(mine, stats)  # together where that is faster (a GPU)
        factor_s = (time.perf_counter() - t0) / max(len(factors), 1)
        for group in mine:
            factor = factors.pop(group[0].path, None)
            # On the host, a shared factor and one layer's solve at a time (the same values).
            results, joint_s = solve_jointly(group, stats, one_by_one=host and row_slices_exact(),
                                             factor=factor)
            if factor is not None:
                joint_s += factor_s
            for p in group:
                t0 = time.perf_counter()
                result = next(results)
                solve_s = time.perf_counter() - t0
                module, record = self.quantize_layer(
                    p, stats.pop(p.path, None), result,
                    factor=None if result is not None else factor)
                record.time_s += joint_s / len(group) + solve_s
                record.block, record.rank = block_index, rank
                done[p.path] = (module, record)
                if release:
                    release_float(model, p, module, parked)
        done = exchange_layers(self.distributed, plans, done, owners)
        new_modules = []
        for p in plans:
            module, record = done[p.path]
            report.add(record)
            self._emit("layer", record=record)
            new_modules.append((p.path, module))
        standins.install(model, plans, new_modules)
        return new_modules

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

    def quantize_layer(
        self, p: LayerPlan, stats: HessianStats | None, result: QuantResult | None = None,
        factor: InverseFactor | FactorizationError | None = None,
    ) -> tuple[nn.Module, LayerRecord]:
        """Quantize one planned layer; fall back to ``self.fallback`` when its strategy cannot
        run (no calibration tokens, Hessian not factorizable, no per-expert support).
        ``result``: the layer's values when they were already computed (a joint solve);
        ``factor``: its inverse-Hessian factor, computed beforehand. The
        work is :func:`quantkit.pipeline.solve.quantize_layer`'s, after every hook's
        :meth:`~quantkit.pipeline.hooks.WalkHook.before_solve`."""
        for hook in self.hooks:
            hook.before_solve(p, stats)
        return quantize_layer(p, stats, self.fallback, self.dtype, result, factor)

    def _config(self, report: RunReport) -> dict[str, Any]:
        return quantization_config(self.recipe, report)

