"""Learned rounding arithmetic (SignRound-style): a quantized weight as a differentiable
function of rounding offsets and per-group scale and bias adjustments, in MLX's affine format.

``u = (W - b0) / s0`` is a weight on the code axis of its stored grid; the learned weight is
``clip(round(u + v), 0, 2**bits - 1) * s + b`` with ``s = s0 (1 + ds)`` and ``b = b0 + db·s0``
(``s`` and ``b`` rounded to the storage dtype), where ``round`` passes gradients straight
through. All learned quantities are in units of one quantization step.
"""

from __future__ import annotations

import math

import mlx.core as mx


def ste_round(x: mx.array) -> mx.array:
    """``round(x)`` whose gradient is the identity (straight-through estimator)."""
    return x + mx.stop_gradient(mx.round(x) - x)


def grid_position(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """``(w - b) / s`` per group: where each weight lies on its group's code axis."""
    g = scales.shape[-1]
    shaped = w.astype(mx.float32).reshape(*w.shape[:-1], g, -1)
    return ((shaped - biases[..., None]) / scales[..., None]).reshape(w.shape)


def learned_weight(u: mx.array, v: mx.array, scales0: mx.array, biases0: mx.array,
                   ds: mx.array, db: mx.array, bits: int, storage: mx.Dtype = mx.float32
                   ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """``(weight, codes, scales, biases)``: the dequantized weight ``(..., in)`` (float32) and the
    stored values it comes from (codes as float, scales and biases rounded to ``storage``)."""
    codes = mx.clip(ste_round(u + v), 0, (1 << bits) - 1)
    s = (scales0 * (1 + ds)).astype(storage).astype(mx.float32)
    b = (biases0 + db * scales0).astype(storage).astype(mx.float32)
    g = s.shape[-1]
    w = codes.reshape(*codes.shape[:-1], g, -1) * s[..., None] + b[..., None]
    return w.reshape(codes.shape), codes, s, b


def sign_step(x: mx.array, grad: mx.array, lr: float, bound: float) -> mx.array:
    """One signed-gradient step, clipped to ``[-bound, bound]``."""
    return mx.clip(x - lr * mx.sign(grad), -bound, bound)


def step_scale(inputs: int, width: int | None) -> float:
    """The factor on a signed step for a layer with ``inputs`` input features:
    ``sqrt(width / inputs)`` where it reads more than ``width`` (``None``: never), else 1."""
    if width is None or inputs <= width:
        return 1.0
    return math.sqrt(width / inputs)


def learned_weight_grads(u: mx.array, v: mx.array, scales0: mx.array, biases0: mx.array,
                         ds: mx.array, db: mx.array, bits: int, storage: mx.Dtype,
                         cotangent: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``(dv, dds, ddb)``: the gradients of :func:`learned_weight`'s weight for the weight's
    ``cotangent``, the values MLX's automatic differentiation gives (the same operations:
    ``round`` passes gradients straight through, ``clip`` none at or beyond its bounds, the
    storage casts round the scale and bias gradients as they round the values), computed from
    the inputs again instead of from the forward pass's full-size intermediates, so that a
    backward pass holds a few weight-sized temporaries instead of about ten."""
    hi = (1 << bits) - 1
    x = u + v
    r = x + (mx.round(x) - x)
    passes = mx.greater(r, 0.0)  # maximum(r, 0)'s gradient mask
    m = mx.maximum(r, 0.0)
    passes_hi = mx.less(m, float(hi))  # minimum(m, hi)'s
    codes = mx.minimum(m, float(hi))
    g = scales0.shape[-1]
    grouped = codes.reshape(*codes.shape[:-1], g, -1)
    dw = cotangent.reshape(grouped.shape)
    s = (scales0 * (1 + ds)).astype(storage).astype(mx.float32)
    d_s = mx.sum(dw * grouped, axis=-1, keepdims=True).reshape(s.shape)
    d_b = mx.sum(dw, axis=-1, keepdims=True).reshape(s.shape)
    dds = d_s.astype(storage).astype(mx.float32) * scales0
    ddb = d_b.astype(storage).astype(mx.float32) * scales0
    dv = ((dw * s[..., None]).reshape(codes.shape) * passes_hi) * passes
    return dv, dds, ddb


def token_weights(targets: mx.array, eps: float = 1e-12) -> mx.array:
    """``1 / mean(t²)`` over the last axis of ``targets``, per position, ``(..., 1)`` (float32):
    weights that make a squared error relative to the size of the position's target."""
    t = targets.astype(mx.float32)
    return 1.0 / (mx.mean(mx.square(t), axis=-1, keepdims=True) + eps)


def kl_divergence(target_logits: mx.array, logits: mx.array) -> mx.array:
    """``KL(softmax(target) ‖ softmax(logits))`` over the last axis, per position (float32)."""
    log_p = target_logits.astype(mx.float32)
    log_p = log_p - mx.logsumexp(log_p, axis=-1, keepdims=True)
    log_q = logits.astype(mx.float32)
    log_q = log_q - mx.logsumexp(log_q, axis=-1, keepdims=True)
    return mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)
