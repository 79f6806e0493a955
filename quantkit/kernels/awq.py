"""Activation-aware scaling (AWQ) arithmetic: per-channel magnitudes, the scales of one grid
point, and folding scales into the producer of a channel and its readers.

A channel ``c`` read by linears ``W`` is scaled by ``s_c``: the readers' columns are multiplied
by ``s`` and the producer's output divided by it, so ``(W diag(s)) (x / s) = W x`` — the float
function is unchanged while channels with large activations get finer quantization steps.
"""

from __future__ import annotations

import mlx.core as mx


def channel_abs_sum(x: mx.array) -> tuple[mx.array, int]:
    """``(sum of |x| over every axis but the last, number of rows summed)``, float32."""
    rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    return mx.abs(rows).sum(axis=0), rows.shape[0]


def awq_scales(magnitude: mx.array, alpha: float) -> mx.array:
    """AWQ's scales for exponent ``alpha``: ``magnitude ** alpha`` (floored at 1e-4), divided by
    the geometric mean of its extremes so they straddle 1. ``alpha = 0``: all ones."""
    s = mx.maximum(mx.power(magnitude.astype(mx.float32), alpha), 1e-4)
    return s / mx.sqrt(s.max() * s.min())


def fake_quantize(w: mx.array, bits: int, group_size: int, mode: str = "affine") -> mx.array:
    """``w`` rounded to nearest on MLX's grid and dequantized (float32), groups on the last axis."""
    shape = w.shape
    flat = w.astype(mx.float32).reshape(-1, shape[-1])
    packed = mx.quantize(flat, group_size=group_size, bits=bits, mode=mode)
    out = mx.dequantize(*packed, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    return out.reshape(shape)


def scaled_fake_quantize(w: mx.array, s: mx.array, bits: int, group_size: int,
                         mode: str = "affine") -> mx.array:
    """The weight a reader computes with once scaled by ``s`` and quantized, expressed on the
    unscaled input: ``Q(w · s) / s``."""
    return fake_quantize(w * s, bits, group_size, mode) / s


def fold_into_norm(weight: mx.array, s: mx.array, offset: float = 0.0) -> mx.array:
    """A norm's new weight when its output is divided by ``s``: the norm multiplies by
    ``weight + offset`` (``offset = 1`` for Gemma-style ``1 + weight`` norms)."""
    return ((weight.astype(mx.float32) + offset) / s - offset).astype(weight.dtype)


def fold_into_rows(w: mx.array, s: mx.array) -> mx.array:
    """A producing linear's weight ``(..., out, in)`` (or bias ``(..., out)``) when its output
    channels are divided by ``s``."""
    if w.ndim >= 2:
        return (w.astype(mx.float32) / s[:, None]).astype(w.dtype)
    return (w.astype(mx.float32) / s).astype(w.dtype)


def scale_columns(w: mx.array, s: mx.array) -> mx.array:
    """A reading linear's weight ``(..., out, in)`` with its input columns multiplied by ``s``."""
    return (w.astype(mx.float32) * s).astype(w.dtype)
