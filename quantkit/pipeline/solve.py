"""Solve: one weight matrix and its statistics → its packed arrays, with the strategy's fallback,
the Hessian-weighted error figures and what the run report records — written once, for a dense
layer (:func:`quantize_layer`) and for one expert of a MoE layer (:mod:`quantkit.pipeline.expert_layers`) alike
(:func:`solve_matrix`). Layers sharing a Hessian are solved as one matrix first
(:func:`solve_groups`, :func:`solve_jointly`); with several processes each solves its share and
:func:`exchange_layers` hands every rank the others'."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..distributed import Distributed, Item
from ..errors import FactorizationError
from ..hessian import HessianStats
from ..inverse import InverseFactor, InverseStrategy
from ..quantizers import Quantizer, QuantResult, hessian_figures
from ..report import LayerRecord
from ..specs import QuantSpec
from ..validate import check_packed
from . import build
from .plan import LayerPlan


@attrs.frozen
class Solved:
    """One matrix solved and packed. ``strategy``: the quantizer that produced it;
    ``fell_back``: the fallback's, because the strategy could not run (``reason`` says why);
    ``figures``: ``(error, output energy, round-to-nearest error)``, Hessian-weighted
    (``None`` when not measured); ``damping``: what the factorization used, if any."""

    packed: dict[str, mx.array]
    strategy: Quantizer
    fell_back: bool = False
    reason: str | None = None
    damping: float | None = None
    figures: tuple[float, float, float] | None = None


def solve_matrix(
    weight: mx.array, spec: QuantSpec, storage_dtype: mx.Dtype, *, quantizer: Quantizer,
    stats: HessianStats | None, fallback: Quantizer, measure: HessianStats | None = None,
    refused: str | None = None, result: QuantResult | None = None,
    factor: InverseFactor | FactorizationError | None = None, chunked: bool = True,
) -> Solved:
    """Quantize ``weight`` with ``quantizer`` (given ``stats``), or with ``fallback`` when the
    strategy cannot run: ``refused`` names a reason known beforehand, or the factorization
    fails (:class:`FactorizationError`); measure the error with ``measure.h``; pack.

    ``result``: the values when they were already computed (a joint solve). ``factor``: a
    precomputed inverse-Hessian factor for the strategy (or the error computing it raised).
    ``chunked``: quantize a slice of output rows at a time
    (:meth:`~quantkit.quantizers.Quantizer.quantize_chunks`), each measured and packed, then
    dropped, so only the packed matrix is ever held whole; else in one piece."""
    rows_all = slice(0, weight.shape[0])
    chunks = None if result is None else iter([(rows_all, result)])
    reason = refused
    if reason is None and chunks is None:
        try:
            if isinstance(factor, FactorizationError):
                raise factor
            kwargs = {} if factor is None else {"factor": factor}
            if chunked:
                chunks = started(quantizer.quantize_chunks(weight, spec, stats, storage_dtype,
                                                           **kwargs))
            else:
                chunks = iter([(rows_all, quantizer.quantize(weight, spec, stats, storage_dtype,
                                                             **kwargs))])
        except FactorizationError as exc:
            reason = str(exc)
    used, fell_back = quantizer, chunks is None
    if chunks is None:
        used = fallback
        chunks = (fallback.quantize_chunks(weight, spec, stats, storage_dtype) if chunked
                  else iter([(rows_all, fallback.quantize(weight, spec, stats, storage_dtype))]))
    measuring = measure is not None and measure.n_tokens > 0 and weight.ndim == 2
    figures, parts, damping = np.zeros(3), [], None
    for rows, part in chunks:
        damping = part.info.get("damping")
        if measuring:
            assert measure is not None
            figures += hessian_figures(weight[rows], part.dequantized, measure.h, spec,
                                       storage_dtype)
        parts.append(build.pack(part, spec, storage_dtype))
        del part
    e, energy, rtn = (float(v) for v in figures)
    return Solved(packed=build.join_rows(parts), strategy=used, fell_back=fell_back,
                  reason=reason, damping=damping,
                  figures=(e, energy, rtn) if measuring else None)


def quantize_layer(p: LayerPlan, stats: HessianStats | None, fallback: Quantizer,
                   dtype: str | None, result: QuantResult | None = None,
                   factor: InverseFactor | FactorizationError | None = None
                   ) -> tuple[nn.Module, LayerRecord]:
    """Quantize one planned dense layer; fall back to ``fallback`` when its strategy cannot run
    (no calibration tokens, Hessian not factorizable, no per-expert support). ``result``: the
    layer's values when they were already computed (a joint solve); ``factor``: its strategy's
    factor, computed beforehand (:func:`factor_groups`). ``dtype``: the calibration dtype
    (named in the error when a stored array is Inf/NaN)."""
    t0 = time.perf_counter()
    weight = p.handler.weight(p.module)  # made float32 a slice of rows at a time
    record = LayerRecord(
        p.path, type(p.module).__name__, "quantized", strategy=p.quantizer.name,
        requested=p.rule.strategy, rule=p.rule_index, bits=p.spec.bits,
        group_size=p.spec.group_size, mode=p.spec.mode, reason=p.note, n_params=weight.size,
        n_tokens=None if stats is None else stats.n_tokens,
    )
    refused = None
    if p.quantizer.needs_hessian and not p.needs_stats:
        refused = f"{record.layer_class}: expert layer outside the decoder blocks"
    elif p.quantizer.needs_hessian and (stats is None or stats.n_tokens == 0):
        refused = "no calibration activations reached this layer"
    solved = solve_matrix(weight, p.spec, p.storage_dtype, quantizer=p.quantizer, stats=stats,
                          fallback=fallback, measure=stats, refused=refused, result=result,
                          factor=None if refused else factor)
    record.damping = solved.damping
    if solved.fell_back:
        record.status = "fallback"
        record.strategy = solved.strategy.name
        record.reason = "; ".join(r for r in (p.note, solved.reason) if r)
    if solved.figures is not None:
        e, energy, rtn = solved.figures
        record.hessian_error, record.rtn_hessian_error = e, rtn
        record.relative_error = e / energy if energy > 0 else 0.0
    check_packed(p.path, solved.packed, dtype)  # reliab: no Inf/NaN written
    module = build.build(p, solved.packed)
    record.time_s = time.perf_counter() - t0
    return module, record


def solve_groups(plans: list[LayerPlan], stats: dict[str, HessianStats]) -> list[list[LayerPlan]]:
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


#: At most this many matrix entries (the sum of ``n²``) are factorized together by
#: :func:`factor_groups`: each holds a few ``n²`` float32 arrays while in flight, and its factor
#: until its layers are solved.
TOGETHER_ENTRIES = 64 * 2**20


def factor_groups(groups: list[list[LayerPlan]], stats: dict[str, HessianStats]
                  ) -> dict[str, InverseFactor | FactorizationError]:
    """The inverse-Hessian factors of ``groups`` (each solved as one matrix, see
    :func:`solve_groups`), keyed by each group's first path, computed together where the
    strategy does better that way (:attr:`~quantkit.inverse.InverseStrategy.together`: on a GPU
    the factorizations run in lockstep, one wait for the device per step instead of one per
    step of each), up to :data:`TOGETHER_ENTRIES` at a time; groups whose quantizer takes no
    precomputed factor, or whose strategy does not gain, are left out (factorized in their
    solve, as before)."""
    jobs: list[tuple[str, InverseStrategy, mx.array, np.ndarray | None]] = []
    for group in groups:
        st = stats.get(group[0].path)
        if st is None or st.n_tokens == 0 or not group[0].needs_stats:
            continue
        request = group[0].quantizer.factor_request(st)
        if request is not None and request[0].together:
            jobs.append((group[0].path, *request))
    out: dict[str, InverseFactor | FactorizationError] = {}
    while jobs:
        strategy, size = jobs[0][1], 0
        batch: list[tuple[str, InverseStrategy, mx.array, np.ndarray | None]] = []
        for job in [j for j in jobs if j[1] == strategy]:
            n2 = job[2].shape[-1] ** 2
            if batch and size + n2 > TOGETHER_ENTRIES:
                break
            batch.append(job)
            size += n2
        factors = strategy.factor_together([(h, perm) for _, _, h, perm in batch])
        out.update((path, f) for (path, *_), f in zip(batch, factors, strict=True))
        jobs = [j for j in jobs if j[0] not in out]
    return out


def solve_jointly(group: list[LayerPlan], stats, one_by_one: bool = False,
                  factor: InverseFactor | FactorizationError | None = None
                  ) -> tuple[Iterator[QuantResult | None], float]:
    """Layers sharing one Hessian, spec and row-independent quantizer are solved as one
    matrix (their rows stacked): one factorization, one pass of the column loop. Yields
    ``None`` for each (solve each on its own) when that does not apply or fails; returns the
    results and the seconds spent.

    ``factor``: the group's factor, computed beforehand (:func:`factor_groups`).

    ``one_by_one``: where the quantizer takes a precomputed factor (GPTQ without act-order),
    or gives a solver for weights sharing statistics (``shared_solver``: GPTQ with act-order),
    factorize once and solve each layer with it when the caller asks for its result (the
    iterator is lazy): the same values where the column loop's products give a matrix's row
    slices as the stacked matrix's (each output row depends on its own weight row only), with
    one layer's copies held at a time instead of the stack's (the CPU path, see
    :func:`quantkit.host.row_slices_exact`)."""
    if len(group) == 1:
        return iter([None]), 0.0
    t0 = time.perf_counter()
    p0 = group[0]
    strategy = p0.quantizer.factor_strategy() if one_by_one else None
    if strategy is not None:
        try:
            factor = strategy.factor(stats[p0.path].h)
        except FactorizationError:
            return iter([None] * len(group)), time.perf_counter() - t0
        paths, shared = [p.path for p in group], stats[p0.path]

        def each() -> Iterator[QuantResult | None]:
            for p in group:
                r = p.quantizer.quantize(p.handler.weight(p.module).astype(mx.float32), p.spec,
                                         shared, p.storage_dtype, **{"factor": factor})
                yield attrs.evolve(r, info=dict(r.info, joint_with=paths))
        return each(), time.perf_counter() - t0
    shared_solver = getattr(p0.quantizer, "shared_solver", None) if one_by_one else None
    if shared_solver is not None:  # (GPTQ with act-order: the factor is of the permuted Hessian)
        try:
            solve = shared_solver(p0.spec, stats[p0.path], p0.storage_dtype)
        except FactorizationError:
            return iter([None] * len(group)), time.perf_counter() - t0
        paths = [p.path for p in group]

        def each_shared() -> Iterator[QuantResult | None]:
            for p in group:
                r = solve(p.handler.weight(p.module).astype(mx.float32))
                yield attrs.evolve(r, info=dict(r.info, joint_with=paths))
        return each_shared(), time.perf_counter() - t0
    weights = [p.handler.weight(p.module).astype(mx.float32) for p in group]
    try:
        if isinstance(factor, FactorizationError):
            raise factor
        kwargs = {} if factor is None else {"factor": factor}
        joint = p0.quantizer.quantize(mx.concatenate(weights, axis=0), p0.spec,
                                      stats[p0.path], p0.storage_dtype, **kwargs)
    except FactorizationError:
        return iter([None] * len(group)), 0.0
    results: list[QuantResult | None] = []
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
    return iter(results), time.perf_counter() - t0


def exchange_layers(group: Distributed, plans: list[LayerPlan],
                    done: dict[str, tuple[nn.Module, LayerRecord]],
                    owners: dict[str, int]) -> dict[str, tuple[nn.Module, LayerRecord]]:
    """Every rank's quantized layers on every rank: ``done`` holds this rank's own, ``owners``
    says which rank solved each layer of ``plans``; the others' come back as parameters and
    are rebuilt here (:func:`~quantkit.pipeline.build.from_parameters`)."""
    if group.size == 1:
        return done
    mine: list[Item] = [
        ({"path": p.path, "record": attrs.asdict(done[p.path][1])},
         cast(list[tuple[str, mx.array]], tree_flatten(done[p.path][0].parameters())))
        for p in plans if owners[p.path] == group.rank]
    by_path = {p.path: p for p in plans}
    out = dict(done)
    for r, items in enumerate(group.exchange(mine, "exchanging quantized layers")):
        if r == group.rank:
            continue
        for meta, params in items:
            p = by_path[meta["path"]]
            module = build.from_parameters(p, params)
            out[p.path] = (module, LayerRecord(**meta["record"]))
    return out


def started(chunks: Iterator[tuple[slice, QuantResult]]) -> Iterator[tuple[slice, QuantResult]]:
    """``chunks`` with its first item already computed, so that a failure to start (e.g. a
    :class:`FactorizationError` while factorizing) is raised here."""
    first = next(chunks)
    return itertools.chain([first], chunks)
