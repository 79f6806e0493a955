"""Expert layers (mixture of experts): one Hessian per expert, collected and solved a batch at a time.

(This is how the walk quantizes a block's expert layers; :mod:`quantkit.experts` is the
``calibrate_all_experts`` option's wrapper, which these collection passes install.)

mlx-lm's ``SwitchLinear`` holds all experts of a layer in one ``(experts, out, in)`` weight and
is called with the expert ``indices`` of every row. Experts see different tokens, and the
hidden units of one expert's down projection have nothing to do with another's, so one Hessian
over all rows (mlx-lm's GPTQ) misjudges every expert. Here each expert is quantized with the
Hessian of the rows routed to it.

Memory versus time. Holding every expert's Hessian at once costs
``experts · in² · 4`` bytes per layer (128 experts at ``in = 2048``: 2 GiB per projection).
Instead the block's calibration forward is run once per *expert batch*: each pass collects the
Hessians of ``expert_batch_size`` experts of every expert layer in the block, those experts are
quantized and their Hessians dropped before the next pass. The price is
``ceil(experts / expert_batch_size)`` forward passes of one block over the calibration tokens
instead of one — small next to solving the experts, whose cost does not change. Storing the
routed activations instead would need ``tokens · top_k · in · 4`` bytes per layer, usually more
than the Hessians. The passes run after the block's other layers (attention, router, shared
experts) are quantized and swapped in, so experts are calibrated on the tokens the quantized
router actually sends them, and every pass sees the same routing.

Starved experts — sent fewer than ``min_token_share`` of the calibration tokens (every token
passes every MoE layer once and is sent to ``top_k`` experts, so the mean share is
``top_k / experts``: 25% for Mixtral-8x, 6.25% for Qwen3-MoE's 128 experts, top 8), or none —
are quantized with the handler's calibration-free ``starved`` strategy (round to nearest by
default) and listed in the report, one :class:`LayerRecord` with ``expert`` set per such expert
(its parameters are counted in the layer's record, not again there).

The inverse-Hessian factors of a batch's experts are computed together (:func:`expert_factors`:
one :meth:`~quantkit.inverse.InverseStrategy.factor_many` on the stacked Hessians, one host
round-trip per diagonal block for the whole batch), then each expert runs its column loop.

Expert parallelism. With several processes (:class:`~quantkit.distributed.Distributed`), every
rank gets the same merged statistics of an expert batch; the batch's experts (of all expert
layers of the block) are then dealt out to the ranks by estimated solve cost, each rank
quantizes its own, and the packed experts with their figures are exchanged before the next
batch. An expert's result depends only on its weight and its merged Hessian, so the output is
the same bytes whichever rank solved it. The layer's record lists who solved each expert
(``expert_ranks``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..arch import shared_input_groups
from ..distributed import Distributed, Item, ShardLayout
from ..errors import FactorizationError
from ..experts import AllExpertsCalibration, experts_parents
from ..hessian import ExpertHessianStats, HessianCollector, HessianStats
from ..interrupt import check
from ..inverse import InverseFactor
from ..quantizers import Quantizer
from ..registry import SwitchLinearHandler
from ..report import LayerRecord
from . import build
from .plan import LayerPlan
from .solve import solve_matrix

#: Runs the block's calibration forward with ``collectors`` (keyed by path) on ``plans``.
Collect = Callable[[list[LayerPlan], dict[str, HessianCollector]], None]
#: Installs ``collectors`` on ``plans``' layers and runs the passes ``forward()`` yields.
RunCollectors = Callable[[list[LayerPlan], dict[str, HessianCollector], Callable[[], Iterable]], None]


@attrs.frozen
class ExpertOutcome:
    """How one expert was quantized; errors are Hessian-weighted (``None`` without tokens)."""

    expert: int
    n_tokens: int
    share: float
    strategy: str
    status: str  # "quantized" | "fallback"
    reason: str | None = None
    hessian_error: float | None = None
    energy: float | None = None
    rtn_hessian_error: float | None = None
    damping: float | None = None
    time_s: float = 0.0
    rank: int = 0  # the process that quantized it


def _choose(p: LayerPlan, stats: ExpertHessianStats, i: int, fallback: Quantizer,
            calibration_tokens: int) -> tuple[Quantizer, str | None, float]:
    """``(strategy, reason, share)`` for expert ``stats.experts[i]``: the recipe's, or the
    handler's ``starved`` one (``fallback`` if that needs a Hessian the expert lacks)."""
    handler = cast(SwitchLinearHandler, p.handler)
    n = stats.expert_tokens[i]
    share = _share(stats, i, calibration_tokens)
    if not _starved(p, stats, i, calibration_tokens):
        return p.quantizer, None, share
    reason = (f"starved: {n} of {calibration_tokens} calibration tokens "
              f"({100 * share:.2f}% < {100 * handler.min_token_share:.2f}%)")
    quantizer = handler.starved
    if quantizer.needs_hessian and n == 0:
        quantizer = fallback
    return quantizer, reason, share


def expert_cost(p: LayerPlan, stats: ExpertHessianStats, i: int, fallback: Quantizer,
                calibration_tokens: int) -> float:
    """Rough cost of quantizing expert ``stats.experts[i]``: ``out·in²`` with a Hessian (GPTQ's
    column loop and the error figures), ``out·in`` without (a starved expert's round to
    nearest)."""
    _, out, width = p.handler.weight(p.module).shape
    quantizer, _, _ = _choose(p, stats, i, fallback, calibration_tokens)
    return float(out * width * (width if quantizer.needs_hessian else 1))


def _share(stats: ExpertHessianStats, i: int, calibration_tokens: int) -> float:
    n = stats.expert_tokens[i]
    return n / calibration_tokens if calibration_tokens else stats.share(i)


def _starved(p: LayerPlan, stats: ExpertHessianStats, i: int, calibration_tokens: int) -> bool:
    """Whether ``stats.experts[i]`` gets the handler's ``starved`` strategy (too few tokens)."""
    handler = cast(SwitchLinearHandler, p.handler)
    return (stats.expert_tokens[i] == 0
            or _share(stats, i, calibration_tokens) < handler.min_token_share)


def expert_factors(
    p: LayerPlan, stats: ExpertHessianStats, calibration_tokens: int,
    indices: Iterable[int] | None = None,
) -> dict[int, InverseFactor | FactorizationError]:
    """Inverse-Hessian factors of the experts ``stats.experts[i]`` (``i`` in ``indices``; all by
    default) that get the recipe's strategy (not starved), keyed by ``i``: one
    :meth:`~quantkit.inverse.InverseStrategy.factor_many` call on their stacked Hessians, so each
    holds what factorizing it alone would give (or the error that would raise). Empty when the
    strategy takes no precomputed factor (:meth:`~quantkit.quantizers.Quantizer.factor_strategy`)."""
    strategy = p.quantizer.factor_strategy()
    chosen = range(len(stats.experts)) if indices is None else indices
    idx = [i for i in chosen if not _starved(p, stats, i, calibration_tokens)]
    if strategy is None or not idx:
        return {}
    if stats.h.shape[0] == 1:  # one Hessian shared by all experts: one factor
        return dict.fromkeys(idx, strategy.factor_many(stats.h)[0])
    hs = stats.h if idx == list(range(stats.h.shape[0])) else stats.h[mx.array(idx)]
    return dict(zip(idx, strategy.factor_many(hs), strict=True))


def quantize_expert(
    p: LayerPlan, weight: mx.array, stats: ExpertHessianStats, i: int, fallback: Quantizer,
    calibration_tokens: int, factor: InverseFactor | FactorizationError | None = None,
) -> tuple[dict[str, mx.array], ExpertOutcome]:
    """Quantize expert ``stats.experts[i]`` (``weight (out, in)`` float32) of plan ``p``: with
    the recipe's strategy and the expert's own Hessian; with the handler's ``starved`` strategy
    when it was sent less than ``min_token_share`` of the ``calibration_tokens``; with
    ``fallback`` when its Hessian cannot be factorized (the common step:
    :func:`~quantkit.pipeline.solve.solve_matrix`). ``factor``: the expert's entry of
    :func:`expert_factors`, if any (else the recipe's strategy factorizes the Hessian itself).
    Returns the expert's packed arrays and how it went."""
    t0 = time.perf_counter()
    expert, n = stats.experts[i], stats.expert_tokens[i]
    own = stats.expert(i) if n > 0 else None
    quantizer, reason, share = _choose(p, stats, i, fallback, calibration_tokens)
    if quantizer is not p.quantizer:
        factor = None  # a factor is the recipe strategy's
    solved = solve_matrix(weight, p.spec, p.storage_dtype, quantizer=quantizer,
                          stats=own if quantizer.needs_hessian else None, fallback=fallback,
                          measure=own, factor=factor, chunked=False)
    outcome = ExpertOutcome(
        expert=expert, n_tokens=n, share=share, strategy=solved.strategy.name,
        status="quantized" if solved.strategy is p.quantizer else "fallback",
        reason=solved.reason if solved.fell_back else reason, damping=solved.damping,
    )
    if solved.figures is not None:
        err, energy, rtn = solved.figures
        outcome = attrs.evolve(outcome, hessian_error=err, energy=energy, rtn_hessian_error=rtn)
    return solved.packed, attrs.evolve(outcome, time_s=time.perf_counter() - t0)


def quantize_expert_layers(
    plans: list[LayerPlan], collect: Collect, fallback: Quantizer, calibration_tokens: int,
    distributed: Distributed | None = None, same_input: dict[str, str] | None = None,
) -> list[tuple[LayerPlan, nn.Module, list[LayerRecord]]]:
    """Calibrate and quantize the expert layers of one block, a batch of experts per forward
    pass (see the module docstring); ``calibration_tokens``: tokens each pass runs through the
    block. With ``distributed``, each rank solves its share of every batch's experts and the
    results are exchanged (every rank returns the same layers). ``same_input[path]``: the
    layer called with the very same inputs as ``path`` (a ``SwitchGLU``'s up projection: its
    gate projection), whose Hessians — and, for the same factor strategy, factors — ``path``
    takes instead of collecting its own: the same values, once. Returns, per plan, the
    quantized layer and its records: the layer's own, then one per expert that did not get
    the recipe's strategy."""
    group = distributed if distributed is not None else Distributed()
    source = {p.path: (same_input or {}).get(p.path, p.path) for p in plans}
    handlers = {p.path: cast(SwitchLinearHandler, p.handler) for p in plans}
    batches = {p.path: handlers[p.path].expert_batches(p.module) for p in plans}
    # Each expert is packed as soon as it is quantized: only the stored arrays are kept.
    packed: dict[str, dict[int, dict[str, mx.array]]] = {p.path: {} for p in plans}
    outcomes: dict[str, dict[int, ExpertOutcome]] = {p.path: {} for p in plans}
    layer_tokens: dict[str, int] = {}
    routed_rows: dict[str, int | None] = {}
    for r in range(max(len(b) for b in batches.values())):
        check("experts")  # reliab: a place to stop at every expert batch
        active = [p for p in plans if r < len(batches[p.path])]
        collected = [p for p in active if source[p.path] == p.path]
        collectors: dict[str, HessianCollector] = {
            p.path: handlers[p.path].collector(p.module, batches[p.path][r]) for p in collected
        }
        collect(collected, collectors)
        stats = {p.path: cast(ExpertHessianStats, collectors.pop(p.path).stats())
                 for p in collected}
        stats.update({p.path: stats[source[p.path]] for p in active})
        units = [(p, i) for p in active for i in range(len(stats[p.path].experts))]
        owners = group.share([expert_cost(p, stats[p.path], i, fallback, calibration_tokens)
                              for p, i in units])
        mine: list[Item] = []
        mine_of = {p.path: [i for (q, i), owner in zip(units, owners, strict=True)
                            if q is p and owner == group.rank] for p in active}
        shared: dict[tuple, tuple[dict, float]] = {}  # factors of a Hessian, by strategy
        for k, p in enumerate(active):
            layer_tokens[p.path] = stats[p.path].n_tokens
            routed_rows[p.path] = stats[p.path].routed_rows
            own = mine_of[p.path]
            key = (source[p.path], p.quantizer.factor_strategy())
            users = [q for q in active[k:] if (source[q.path], q.quantizer.factor_strategy()) == key]
            if key not in shared:
                # Once for every layer of this batch taking this Hessian with this strategy.
                t0 = time.perf_counter()
                wanted = sorted({i for q in users for i in mine_of[q.path]})
                factors = expert_factors(p, stats[p.path], calibration_tokens, wanted)
                shared[key] = factors, time.perf_counter() - t0
            factors, factor_s = shared[key] if len(users) > 1 else shared.pop(key)
            share_of = sum(1 for q in users for i in mine_of[q.path] if i in factors)
            factor_s /= max(1, share_of)  # shared by the experts it serves
            for i in own:
                e = stats[p.path].experts[i]
                # One expert's weight in float32 at a time (all of a layer's: GBs).
                weight = p.handler.weight(p.module)[e].astype(mx.float32)
                arrays, outcome = quantize_expert(p, weight, stats[p.path], i,
                                                  fallback, calibration_tokens, factors.get(i))
                if i in factors:
                    outcome = attrs.evolve(outcome, time_s=outcome.time_s + factor_s)
                outcome = attrs.evolve(outcome, rank=group.rank)
                mine.append(({"path": p.path, "outcome": attrs.asdict(outcome)},
                             sorted(arrays.items())))
            del factors  # a layer's factors go before the next Hessian's are computed
        del stats  # this batch's Hessians go here
        for items in group.exchange(mine, f"exchanging quantized experts of {active[0].path}"):
            for meta, arrays in items:
                outcome = ExpertOutcome(**meta["outcome"])
                packed[meta["path"]][outcome.expert] = dict(arrays)
                outcomes[meta["path"]][outcome.expert] = outcome
    out = []
    for p in plans:
        experts = sorted(packed[p.path])
        module = build.build(p, build.stack_experts([packed[p.path].pop(e) for e in experts]))
        records = _records(p, [outcomes[p.path][e] for e in experts], layer_tokens[p.path])
        records[0].routed_tokens = routed_rows[p.path]
        out.append((p, module, records))
    return out


def _records(p: LayerPlan, outcomes: list[ExpertOutcome], layer_tokens: int) -> list[LayerRecord]:
    def record(status: str, strategy: str, **kw) -> LayerRecord:
        return LayerRecord(
            p.path, type(p.module).__name__, status, strategy=strategy,
            requested=p.rule.strategy, rule=p.rule_index, bits=p.spec.bits,
            group_size=p.spec.group_size, mode=p.spec.mode, **kw,
        )

    fell_back = [o for o in outcomes if o.status == "fallback"]
    def token_mean(name: str) -> float | None:
        """Mean over the layer's routed rows of an expert figure (experts with rows only)."""
        pairs = [(o.n_tokens, getattr(o, name)) for o in outcomes if o.n_tokens > 0]
        pairs = [(n, v) for n, v in pairs if v is not None]
        total = sum(n for n, _ in pairs)
        return sum(n * v for n, v in pairs) / total if total else None

    err, rtn, energy = token_mean("hessian_error"), token_mean("rtn_hessian_error"), \
        token_mean("energy")
    dampings = [o.damping for o in outcomes if o.damping is not None]
    summary = None
    if fell_back:
        summary = (f"{len(fell_back)} of {len(outcomes)} experts fell back: " + ", ".join(
            f"{o.expert} ({o.n_tokens} rows, {o.strategy})" for o in fell_back))
    all_fell_back = len(fell_back) == len(outcomes)
    ranks = [o.rank for o in outcomes]
    layer = record(
        "fallback" if all_fell_back else "quantized",
        fell_back[0].strategy if all_fell_back else p.quantizer.name,
        reason="; ".join(r for r in (p.note, summary) if r) or None,
        n_params=int(np.prod(p.handler.weight(p.module).shape)), n_tokens=layer_tokens,
        hessian_error=err, rtn_hessian_error=rtn,
        relative_error=(err / energy if err is not None and energy else None),
        damping=max(dampings) if dampings else None,
        time_s=sum(o.time_s for o in outcomes),
        rank=min(ranks), expert_ranks=ranks,
    )
    per_expert = [
        record("fallback", o.strategy, reason=o.reason, expert=o.expert, n_tokens=o.n_tokens,
               hessian_error=o.hessian_error, rtn_hessian_error=o.rtn_hessian_error,
               time_s=o.time_s, rank=o.rank)
        for o in fell_back
    ]
    return [layer, *per_expert]


def expert_shard_stats(run_collectors: RunCollectors, active: list[LayerPlan],
                       like: dict[str, HessianCollector], forward) -> dict[str, HessianStats]:
    """One calibration shard's per-expert statistics, flattened to plain
    :class:`HessianStats` keyed ``path#expert`` (plus ``path#counts``: every expert's share of
    the routed rows) so the shard tree merges each expert by its own token count.
    ``run_collectors(plans, collectors, forward)`` runs the block's passes with them installed."""
    fresh = {p.path: p.handler.collector(p.module, like[p.path].experts) for p in active}
    run_collectors(active, fresh, forward)
    out: dict[str, HessianStats] = {}
    for path, c in fresh.items():
        counts = c.counts.astype(mx.float32)
        rows = int(cast(int, mx.sum(c.counts).item()))
        out[f"{path}#counts"] = HessianStats(h=counts / max(rows, 1), n_tokens=rows)
        routed_counts = getattr(c, "routed", None)
        if getattr(c, "all_experts", False) and routed_counts is not None:
            # the rows the router sent, beside the all-experts rows
            routed = int(cast(int, mx.sum(routed_counts).item()))
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


def load_expert_stats(collector, path: str, merged: dict[str, HessianStats]) -> None:
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


def same_input(model: nn.Module, plans: list[LayerPlan]) -> dict[str, str]:
    """``{layer: layer it reads the very same input of}`` among ``plans``, from the model's
    architecture table (e.g. a ``SwitchGLU``'s up projection: its gate projection), where both
    have equal handlers: their Hessians are the same (see :func:`quantize_expert_layers`)."""
    by_path = {p.path: p for p in plans}
    return {path: lead for path, lead in shared_input_groups(model, by_path).items()
            if by_path[lead].handler == by_path[path].handler}


def run_expert_collectors(model: nn.Module, wanted: list[LayerPlan],
                          collectors: dict[str, HessianCollector], forward) -> None:
    """A :data:`RunCollectors`: catchers with ``collectors`` on ``wanted``'s layers (and, for a
    handler with ``calibrate_all_experts``, every expert of the layer's experts module run on
    every token: :class:`~quantkit.experts.AllExpertsCalibration`) while ``forward()``'s passes
    run; the model's layers are put back afterwards."""
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


def collect_experts(model: nn.Module, group: Distributed, layout: ShardLayout, run_batch) -> Collect:
    """The :data:`Collect` of one block for :func:`quantize_expert_layers`: each calibration
    shard of this rank (``run_batch(j)``: the block's forward pass on local batch ``j``) through
    :func:`expert_shard_stats`, merged across ``group``'s ranks in shard order like dense
    layers' statistics, loaded back into the collectors."""
    def collect(active: list[LayerPlan], collectors: dict[str, HessianCollector]) -> None:
        merged = group.reduce_stats(layout, lambda positions: expert_shard_stats(
            partial(run_expert_collectors, model), active, collectors,
            lambda: (run_batch(j) for j in positions)))
        for p in active:
            load_expert_stats(collectors[p.path], p.path, merged)

    return collect
