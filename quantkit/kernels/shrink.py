"""Shrinking per-expert Hessians towards the layer's shared Hessian.

An expert that saw few tokens has a noisy Hessian; the layer's Hessian over all routed rows is
a steadier estimate of the same input statistics. Blending by token count,
``(n_e H_e + λ H_shared) / (n_e + λ)``, keeps a well-fed expert's own Hessian (``n_e ≫ λ``)
and moves a starved one towards the shared one (``λ`` acts as a prior worth ``λ`` tokens).
"""

from __future__ import annotations

import mlx.core as mx


def shrink(h_expert: mx.array, n_e: mx.array, h_shared: mx.array, lam: float) -> mx.array:
    """``(n_e · h_expert + lam · h_shared) / (n_e + lam)``; ``h_expert (..., n, n)`` with token
    counts ``n_e`` of shape ``h_expert.shape[:-2]`` (or a scalar), ``h_shared (n, n)``.
    ``lam = 0`` returns ``h_expert`` (an expert without tokens keeps its zeros)."""
    if lam == 0:
        return h_expert
    n = mx.array(n_e, dtype=mx.float32)[..., None, None]
    return (n * h_expert + lam * h_shared) / (n + lam)
