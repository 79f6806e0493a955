"""Round-to-nearest affine quantization with exactly MLX's arithmetic.

MLX stores ``w ≈ scale * q + bias`` with ``q`` in ``[0, 2**bits - 1]``, one ``scale``/``bias``
per group of consecutive input columns. ``affine_params`` reproduces how ``mx.quantize`` picks
them (the group edge with the larger magnitude is represented exactly), so codes computed here
pack to the same words ``mx.quantize`` produces.
"""

from __future__ import annotations

import mlx.core as mx


def _grouped(w: mx.array, group_size: int) -> mx.array:
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def affine_params_from_range(
    w_min: mx.array, w_max: mx.array, bits: int
) -> tuple[mx.array, mx.array]:
    """Scale and bias MLX would choose for a group spanning ``[w_min, w_max]``."""
    n_levels = (1 << bits) - 1
    scale = mx.maximum((w_max - w_min) / n_levels, 1e-7)
    if bits == 1:  # MLX keeps plain min/max for one bit: the two levels are the group's edges
        return scale, w_min
    lower_is_edge = mx.abs(w_min) > mx.abs(w_max)
    scale = mx.where(lower_is_edge, scale, -scale)
    edge = mx.where(lower_is_edge, w_min, w_max)
    q0 = mx.round(edge / scale)
    scale = mx.where(q0 != 0, edge / q0, scale)
    bias = mx.where(q0 == 0, mx.zeros_like(edge), edge)
    return scale, bias


def affine_params(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array]:
    """Per-group ``(scales, biases)`` of shape ``(..., in // group_size)`` for ``w (..., in)``."""
    g = _grouped(w.astype(mx.float32), group_size)
    return affine_params_from_range(g.min(axis=-1), g.max(axis=-1), bits)


def affine_quantize(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int
) -> mx.array:
    """Integer codes (uint8, same shape as ``w``) for given per-group scales and biases."""
    group_size = w.shape[-1] // scales.shape[-1]
    g = _grouped(w.astype(mx.float32), group_size)
    q = mx.clip(mx.round((g - biases[..., None]) / scales[..., None]), 0, (1 << bits) - 1)
    return q.reshape(w.shape).astype(mx.uint8)


def affine_dequantize(codes: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """Float32 values ``scale * q + bias`` for integer codes."""
    group_size = codes.shape[-1] // scales.shape[-1]
    g = _grouped(codes.astype(mx.float32), group_size)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    return (g * s + b).reshape(codes.shape)


def hessian_error(w: mx.array, w_hat: mx.array, h: mx.array) -> mx.array:
    """``trace((W - Ŵ) H (W - Ŵ)ᵀ)``: with ``H`` the mean of ``x xᵀ`` over tokens, the mean
    squared output error per token, summed over output features."""
    d = (w.astype(mx.float32) - w_hat.astype(mx.float32))
    return mx.sum((d @ h) * d)
