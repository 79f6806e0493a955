"""GPTAQ (Li et al., 2025, arXiv:2504.02692): GPTQ with asymmetric calibration.

GPTQ fits ``Ŵ X̃ ≈ W X̃`` on the quantized model's inputs ``X̃``. GPTAQ fits ``Ŵ X̃ ≈ W X``,
the full-precision model's output on its own inputs ``X``, so each layer also corrects the error
accumulated in the layers before it. With ``ΔX = X − X̃``, the paper splits the extra term
``W ΔX`` by input feature ("neuron decomposition"): when column ``j`` is quantized, its share
``w_j ΔX_j`` is compensated by the columns still to come. With ``U`` the upper Cholesky factor of
``H⁻¹`` (``H = X̃ X̃ᵀ``) and ``D = ΔX X̃ᵀ``, the compensation for all columns is one matrix,

    P = α · triu₁(D Uᵀ) · U        (row j: the update column j's value spreads to columns > j)

so the column loop only adds ``w_j ⊗ P[j]`` to GPTQ's ``err_j ⊗ U[j] / U[j, j]`` update; ``α``
damps the correction (0.25 in the authors' code). Here the lazy update of the columns after a
block uses the same pre-quantization values ``w_j`` as the in-block update (the authors' code
uses the block's quantized values there).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .gptq import GPTQOutput
from .rtn import affine_params


def asymmetry_matrix(u: np.ndarray, d: np.ndarray, alpha: float) -> np.ndarray:
    """``P = α · triu₁(D Uᵀ) · U`` (float64), from the upper Cholesky factor ``u`` of the
    damped ``H⁻¹`` and ``d = mean((x − x̃) x̃ᵀ)`` (``(in, in)``, row: full-precision side)."""
    return alpha * (np.triu(d @ u.T, k=1) @ u)


def gptaq_quantize(
    w: mx.array,
    u: mx.array,
    p: mx.array,
    *,
    bits: int,
    group_size: int,
    block_size: int = 128,
    storage_dtype: mx.Dtype = mx.float32,
) -> GPTQOutput:
    """Quantize ``w (out, in)`` given ``u`` (upper Cholesky factor of the damped ``H⁻¹``) and
    ``p`` (:func:`asymmetry_matrix`). ``p = 0`` gives exactly GPTQ. Group scales are MLX's
    min/max rule, chosen when the loop reaches a group's first column."""
    n_out, n_in = w.shape
    if n_in % group_size:
        raise ValueError(f"input width {n_in} is not a multiple of group size {group_size}")
    block = max(group_size, (block_size // group_size) * group_size)
    n_levels = (1 << bits) - 1
    u = u.astype(mx.float32)
    p = p.astype(mx.float32)
    rest = w.astype(mx.float32)

    def stored(a: mx.array) -> mx.array:
        return a.astype(storage_dtype).astype(mx.float32)

    codes, deq, all_scales, all_biases = [], [], [], []
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        width = b1 - b0
        w1 = rest[:, :width]
        u1 = u[b0:b1, b0:b1]
        p1 = p[b0:b1, b0:b1]
        q_cols, errs, pre = [], [], []
        for j in range(width):
            if j % group_size == 0:
                s, z = affine_params(w1[:, j : j + group_size], bits, group_size)
                s, z = stored(s[:, 0]), stored(z[:, 0])
                all_scales.append(s)
                all_biases.append(z)
            col = w1[:, j]
            q = mx.clip(mx.round((col - z) / s), 0, n_levels)
            err = (col - (q * s + z)) / u1[j, j]
            # p1[j] is zero up to and including the diagonal: column j becomes its dequantized
            # value, later columns absorb both its rounding error and its input asymmetry.
            w1 = w1 - err[:, None] * u1[j][None, :] + col[:, None] * p1[j][None, :]
            q_cols.append(q)
            errs.append(err)
            pre.append(col)
        rest = rest[:, width:]
        if b1 < n_in:
            rest = rest - mx.stack(errs, axis=1) @ u[b0:b1, b1:] + mx.stack(pre, axis=1) @ p[b0:b1, b1:]
        codes.append(mx.stack(q_cols, axis=1).astype(mx.uint8))
        deq.append(w1)
        mx.eval(codes[-1], deq[-1], rest, all_scales[-1], all_biases[-1])
    return GPTQOutput(
        codes=mx.concatenate(codes, axis=1),
        scales=mx.stack(all_scales, axis=1),
        biases=mx.stack(all_biases, axis=1),
        dequantized=mx.concatenate(deq, axis=1),
    )
