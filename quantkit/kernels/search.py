"""Scale/bias search for affine groups: clip each group's range, keep the clip with least error.

MLX's rule (:func:`~quantkit.kernels.rtn.affine_params`) spans a group's full ``[min, max]``, so
one outlier stretches the step for every other weight of the group. Shrinking the range to
``[a·min, a·max]`` (``a ≤ 1``) clips the outliers and refines the step for the rest; the best
``a`` is picked per group by a grid search over the (optionally weighted) squared error, as in
the clipping searches of AWQ (Lin et al., 2023, arXiv:2306.00978) and OmniQuant's LWC
(Shao et al., 2023, arXiv:2308.13137) — here without learning, just a grid.

Weighting each column's error by ``diag(H)`` (the mean squared activation of that input) makes
the search prefer accuracy where the inputs are large: the diagonal part of the Hessian-weighted
error ``trace(ΔW H ΔWᵀ)``.

Every candidate goes through MLX's own scale/bias rule, and ``a = 1`` (MLX's choice) is always in
the grid, so the result is never worse than plain round-to-nearest on the searched error.
"""

from __future__ import annotations

import mlx.core as mx

from .rtn import _grouped, affine_params_from_range


def shrink_grid(n_grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """``n_grid + 1`` range factors from ``1`` down to ``1 - max_shrink``, evenly spaced."""
    if n_grid < 1 or not 0.0 < max_shrink < 1.0:
        raise ValueError(f"need n_grid >= 1 and 0 < max_shrink < 1, got {n_grid}, {max_shrink}")
    return [1.0 - max_shrink * i / n_grid for i in range(n_grid + 1)]


def search_affine_params(
    w: mx.array,
    bits: int,
    group_size: int,
    importance: mx.array | None = None,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[mx.array, mx.array]:
    """Per-group ``(scales, biases)`` of shape ``(..., in // group_size)`` for ``w (..., in)``,
    chosen among clipped ranges to minimise ``Σ importance_j · (w_j - ŵ_j)²`` per group.

    ``importance (in,)``: non-negative per-column weights (e.g. ``diag(H)``); ``None`` weighs all
    columns equally (plain MSE). Ties keep the larger range (MLX's own choice first).

    The grid's elementwise work runs as ``mx.compile``d kernels, traced once per shape and
    setting (bitwise the uncompiled result): GPTQ calls this once per group of columns. The range
    factors enter as an array, not as constants, so every candidate shares the same kernels."""
    factors = mx.array(shrink_grid(n_grid, max_shrink), dtype=mx.float32)
    return _search_fused(w, factors, bits, group_size, importance)


def _search(
    w: mx.array, factors: mx.array, bits: int, group_size: int, importance: mx.array | None
) -> tuple[mx.array, mx.array]:
    g = _grouped(w.astype(mx.float32), group_size)
    w_min, w_max = g.min(axis=-1), g.max(axis=-1)
    n_levels = (1 << bits) - 1
    imp = None
    if importance is not None:
        imp = importance.astype(mx.float32).reshape(-1, group_size)  # (groups, group_size)
    best_err = best_s = best_b = None
    for k in range(factors.size):
        a = factors[k]
        s, b = affine_params_from_range(w_min * a, w_max * a, bits)
        q = mx.clip(mx.round((g - b[..., None]) / s[..., None]), 0, n_levels)
        d = (q * s[..., None] + b[..., None]) - g
        err = mx.sum(d * d if imp is None else d * d * imp, axis=-1)
        if best_err is None:
            best_err, best_s, best_b = err, s, b
        else:
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_s = mx.where(better, s, best_s)
            best_b = mx.where(better, b, best_b)
    return best_s, best_b


_search_fused = mx.compile(_search)
