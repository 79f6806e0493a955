"""Activation-aware weight scaling (AWQ) as a :class:`BlockTransform`.

For each of the architecture's :class:`~quantkit.arch.ScaleGroup` s of a block, the input
channels the group's linears read are scaled by ``s = m ** alpha`` (``m``: the mean magnitude of
each channel on the block's calibration inputs), the readers' columns multiplied by ``s`` and
the producing norm or linear divided by it. ``alpha`` is searched on a grid: the one whose
round-to-nearest quantized readers give the smallest output error of the group's ``scope``
module wins (``alpha = 0``, no scaling, is on the grid, so the chosen scaling is never worse
than none on the calibration inputs). The float function of the block is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..arch import ScaleGroup
from ..kernels.awq import (
    awq_scales,
    channel_abs_sum,
    fold_into_norm,
    fold_into_rows,
    scale_columns,
    scaled_fake_quantize,
)
from ..registry import Wrapper
from ..specs import QuantSpec
from .base import BlockContext, BlockTransform, register_transform


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` under ``block`` (list items by index), ``None`` if absent."""
    m: Any = block
    for part in path.split("."):
        if isinstance(m, (list, tuple)):
            if not part.isdigit() or int(part) >= len(m):
                return None
            m = m[int(part)]
        elif isinstance(m, dict) and part in m:
            m = m[part]
        else:
            return None
    return m if isinstance(m, nn.Module) else None


class _Recorder(Wrapper):
    """Runs ``module`` and keeps the arguments of every call (and, when ``magnitude``, the sum
    of ``|x|`` per input channel and the rows summed)."""

    def __init__(self, module: nn.Module, magnitude: bool) -> None:
        super().__init__(module)
        self.calls: list[tuple[tuple, dict]] = []
        self.want_magnitude = magnitude
        self.abs_sum: mx.array | None = None
        self.rows = 0

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.want_magnitude:
            s, n = channel_abs_sum(args[0])
            self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
            self.rows += n
        return self.module(*args, **kwargs)


@attrs.frozen
class _Group:
    group: ScaleGroup
    source: nn.Module
    targets: tuple[nn.Module, ...]
    scope: tuple[str, ...]  # the modules whose outputs measure the error (paths in the block)
    spec: QuantSpec


def _none_or_positive(_: Any, attribute: Any, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1 (or None), got {value}")


@register_transform
@attrs.frozen
class ActivationAwareScaling(BlockTransform):
    """``bits``/``group_size``/``mode``: the quantization the search rounds to (``None``: the
    run's, :attr:`BlockContext.spec`); ``n_grid``: grid points of ``alpha`` in
    ``[0, 1)``; ``search_samples``: the search measures each grid point on the block's first
    calibration batches holding at least this many sequences (``None``: all of them; the
    channel magnitudes always come from all of them)."""

    name: ClassVar[str] = "awq"
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    n_grid: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    search_samples: int | None = attrs.field(
        default=8, validator=_none_or_positive)

    def spec_for(self, default: QuantSpec | None) -> QuantSpec:
        """The quantization the search rounds to: this transform's options where given, else
        ``default``'s (the run's, :attr:`BlockContext.spec`), else :class:`QuantSpec`'s."""
        d = default if default is not None else QuantSpec()
        return QuantSpec(bits=self.bits or d.bits, group_size=self.group_size or d.group_size,
                         mode=self.mode or d.mode)

    def apply(self, ctx: BlockContext) -> dict[str, Any]:
        groups, skipped = self._groups(ctx.block, ctx.arch.scale_groups, self.spec_for(ctx.spec))
        if not groups:  # the same on every process (each holds the whole block)
            return {"groups": [], "skipped": skipped}
        # A process without calibration batches (fewer batches than processes) still takes
        # part in every sum, with zero contributions: the processes' sums must pair up.
        recorders = _record(ctx, groups)
        figures = []
        for g in groups:
            rec = recorders[g.scope[0]]
            probe = recorders[g.group.targets[0]] if g.group.scope is not None else rec
            abs_sum = probe.abs_sum if probe.abs_sum is not None else \
                mx.zeros((g.targets[0].weight.shape[-1],))  # no batch here
            total = ctx.reduce(mx.concatenate([abs_sum, mx.array([float(probe.rows)])]))
            magnitude = total[:-1] / mx.maximum(total[-1], 1.0)
            calls = _first_samples(rec.calls, self.search_samples)
            alpha, err0, err = self._search(ctx, g, calls, magnitude)
            s = awq_scales(magnitude, alpha)
            _fold(g, s)
            figures.append({"source": g.group.source, "alpha": alpha,
                            "error_unscaled": err0, "error": err})
        return {"groups": figures, "skipped": skipped}

    def _groups(self, block: nn.Module, table: Sequence[ScaleGroup], base: QuantSpec
                ) -> tuple[list[_Group], list[str]]:
        groups, skipped = [], []
        for g in table:
            source: Any = submodule(block, g.source)
            targets: list[Any] = [submodule(block, t) for t in g.targets]
            if source is None or any(t is None or "weight" not in t for t in targets):
                skipped.append(f"{g.source}: not in this block")
                continue
            width = source.weight.shape[-2] if g.kind == "linear" else source.weight.shape[-1]
            if any(t.weight.shape[-1] != width for t in targets):
                skipped.append(f"{g.source}: {width} output channels but its readers take "
                               f"{sorted({t.weight.shape[-1] for t in targets})}")
                continue
            spec = base.fitted_to(width)
            if spec is None:
                skipped.append(f"{g.source}: no group size divides width {width}")
                continue
            scope = (g.scope,) if g.scope is not None else g.targets
            groups.append(_Group(g, source, tuple(targets), scope, spec))  # type: ignore[arg-type]
        return groups, skipped

    def _search(self, ctx: BlockContext, g: _Group, calls, magnitude: mx.array
                ) -> tuple[float, float, float]:
        modules: list[Any] = [submodule(ctx.block, p) for p in g.scope]
        originals = [t.weight for t in g.targets]
        refs = [[m(*a, **kw) for m in modules] for a, kw in calls]
        mx.eval(refs)
        errors = []
        for k in range(self.n_grid):
            s = awq_scales(magnitude, k / self.n_grid)
            for t, w in zip(g.targets, originals):
                t.weight = scaled_fake_quantize(w, s, g.spec.bits, g.spec.group_size, g.spec.mode)
            total = mx.zeros((2,))
            for (a, kw), ref in zip(calls, refs):
                outs = [m(*a, **kw) for m in modules]
                sq = mx.sum(mx.stack([mx.sum(mx.square(o - r)) for o, r in zip(outs, ref)]))
                count = sum(r.size for r in ref)
                total = total + mx.stack([sq, mx.array(float(count))])
                mx.eval(total)
            total = ctx.reduce(total)
            errors.append(_scalar(total[0] / mx.maximum(total[1], 1.0)))
        for t, w in zip(g.targets, originals):
            t.weight = w
        best = min(range(self.n_grid), key=lambda k: errors[k])
        return best / self.n_grid, errors[0], errors[best]


def _first_samples(calls: list[tuple[tuple, dict]], n: int | None) -> list[tuple[tuple, dict]]:
    """The first recorded calls whose inputs hold ``n`` sequences (all of them: ``None``)."""
    if n is None:
        return calls
    out, seen = [], 0
    for call in calls:
        if seen >= n:
            break
        out.append(call)
        seen += call[0][0].shape[0] if call[0] and call[0][0].ndim >= 3 else 1
    return out


def _scalar(x: mx.array) -> float:
    return float(cast(float, x.item()))


def _record(ctx: BlockContext, groups: list[_Group]) -> dict[str, _Recorder]:
    """Run the block once over its calibration inputs with recorders on every scope module and
    on the first reader of every group (for its channel magnitudes)."""
    wanted: dict[str, bool] = {}
    for g in groups:
        wanted[g.scope[0]] = wanted.get(g.scope[0], False) or g.group.scope is None
        if g.group.scope is not None:
            wanted[g.group.targets[0]] = True
    # Deepest first, so that a recorder of a scope wraps the recorders of its own targets.
    order = sorted(wanted, key=lambda p: -p.count("."))
    recorders: dict[str, _Recorder] = {}
    originals: dict[str, nn.Module] = {}
    for path in order:
        originals[path] = submodule(ctx.block, path)  # type: ignore[assignment]
        recorders[path] = _Recorder(originals[path], wanted[path])
        ctx.block.update_modules(tree_unflatten([(path, recorders[path])]))
    try:
        for j in range(len(ctx.inputs)):
            mx.eval(ctx.forward(ctx.block, j))
            mx.eval([(r.calls[-1], r.abs_sum) for r in recorders.values() if r.calls])
    finally:
        for path in reversed(order):
            ctx.block.update_modules(tree_unflatten([(path, originals[path])]))
    # A recorded scope's submodules are the recorders; calls replay through the originals.
    return recorders


def _fold(g: _Group, s: mx.array) -> None:
    """Divide the source's output channels by ``s`` and multiply the readers' columns by it."""
    src = g.source
    if g.group.kind == "norm":
        src.weight = fold_into_norm(src.weight, s, g.group.offset)
    else:
        src.weight = fold_into_rows(src.weight, s)
        if "bias" in src:
            src.bias = fold_into_rows(src.bias, s)
    for t in g.targets:
        t.weight = scale_columns(t.weight, s)
    mx.eval([src.parameters()] + [t.parameters() for t in g.targets])
