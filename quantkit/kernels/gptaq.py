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

from .gptq import GPTQOutput, gptq_quantize


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
    return gptq_quantize(w, u, bits=bits, group_size=group_size, block_size=block_size,
                         storage_dtype=storage_dtype, asymmetry=p)
