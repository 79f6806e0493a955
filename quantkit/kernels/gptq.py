"""The GPTQ column loop with lazy block updates (Frantar et al., 2022, arXiv:2210.17323).

Columns are quantized left to right; each column's rounding error, divided by the diagonal of
the inverse-Hessian factor, is spread over the columns still to come. Inside a block the update
is applied column by column; the columns after the block receive the block's errors in one
matmul. The lazy graph of a block is evaluated once (one ``mx.eval`` per block).

Group scales are chosen when the loop reaches a group's first column, from the weights as
updated so far (as in the reference implementation), unless fixed ``scales``/``biases`` are given.
With fixed groups the columns may come in any order (``group_index`` names each column's group):
that is act-order with static groups, the stored layout staying MLX's contiguous groups.

Per column the loop issues a handful of MLX operations, so their count sets the speed of small
and medium layers. Columns are kept as ``(out, 1)`` arrays (no reshapes to broadcast them), and
the column's rounding and error — about ten elementwise operations on one column — run as one
``mx.compile``d kernel, with the same arithmetic as the uncompiled operations (the results are
bitwise equal; ``mx.disable_compile()`` gives the uncompiled sequence). The rank-1 update of the
block stays two plain operations: on MLX 0.32's CPU a fused broadcast kernel is slower than the
two vectorized ones (``benchmarks/gptq_loop.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import mlx.core as mx

from .rtn import affine_params

ParamsFn = Callable[[mx.array, int, int], tuple[mx.array, mx.array]]


def _quantize_column(
    col: mx.array, s: mx.array, z: mx.array, u_jj: mx.array, n_levels: int
) -> tuple[mx.array, mx.array]:
    """Codes of one column ``col (out, 1)`` and its rounding error divided by ``u_jj``."""
    q = mx.clip(mx.round((col - z) / s), 0, n_levels)
    return q, (col - (q * s + z)) / u_jj


# Traced once per column height and bit width (``n_levels`` is a constant of the trace).
_quantize_column_fused = mx.compile(_quantize_column)


@attrs.frozen
class GPTQOutput:
    codes: mx.array  # (out, in) uint8
    scales: mx.array  # (out, in // group_size) float32, rounded to the storage dtype
    biases: mx.array
    dequantized: mx.array  # (out, in) float32: scales * codes + biases


def gptq_quantize(
    w: mx.array,
    u: mx.array,
    *,
    bits: int,
    group_size: int,
    block_size: int = 128,
    params_fn: ParamsFn = affine_params,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    storage_dtype: mx.Dtype = mx.float32,
    importance: mx.array | None = None,
    group_index: Sequence[int] | None = None,
    asymmetry: mx.array | None = None,
) -> GPTQOutput:
    """Quantize ``w (out, in)`` given ``u``, the upper Cholesky factor of the damped ``H⁻¹``.

    ``params_fn(w_group, bits, group_size)`` picks a group's scale and bias (MLX's min/max rule
    by default; a clipping search can be passed instead). ``scales``/``biases`` of shape
    ``(out, in // group_size)`` fix them in advance (static groups). Scales and biases are rounded
    to ``storage_dtype`` before use, so the error feedback sees the values actually stored.

    ``importance (in,)``: per-column weights handed to ``params_fn`` as ``importance=`` (that
    group's slice), for searches weighted by ``diag(H)``. ``group_index``: with fixed
    ``scales``/``biases``, the group (column of ``scales``) of each column of ``w`` in the order
    given; default ``j // group_size``. The returned ``scales``/``biases`` are then the fixed
    ones, in their own order. ``asymmetry (in, in)``: GPTAQ's matrix ``P`` (see
    :mod:`quantkit.kernels.gptaq`; zero on and below the diagonal): column ``j``'s
    pre-quantization value times ``P[j]`` is added to the columns after it.
    """
    n_out, n_in = w.shape
    if n_in % group_size:
        raise ValueError(f"input width {n_in} is not a multiple of group size {group_size}")
    block = max(group_size, (block_size // group_size) * group_size)
    n_levels = (1 << bits) - 1
    u = u.astype(mx.float32)
    rest = w.astype(mx.float32)

    def stored(a: mx.array) -> mx.array:
        return a.astype(storage_dtype).astype(mx.float32)

    if scales is not None:
        scales, biases = stored(scales), stored(biases)
        if group_index is None:
            group_index = [j // group_size for j in range(n_in)]
    current = -1

    codes, deq, all_scales, all_biases = [], [], [], []
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        width = b1 - b0
        w1 = rest[:, :width]
        u1 = u[b0:b1, b0:b1]
        p1 = None if asymmetry is None else asymmetry[b0:b1, b0:b1]
        q_cols, errs, pre = [], [], []
        for j in range(width):
            if scales is not None:
                if group_index[b0 + j] != current:
                    current = group_index[b0 + j]
                    s, z = scales[:, current : current + 1], biases[:, current : current + 1]
            elif j % group_size == 0:
                if importance is None:
                    s, z = params_fn(w1[:, j : j + group_size], bits, group_size)
                else:
                    s, z = params_fn(w1[:, j : j + group_size], bits, group_size,
                                     importance=importance[b0 + j : b0 + j + group_size])
                s, z = stored(s[:, :1]), stored(z[:, :1])
                all_scales.append(s)
                all_biases.append(z)
            col = w1[:, j : j + 1]
            q, err = _quantize_column_fused(col, s, z, u1[j, j], n_levels)
            # Row j of u1 is zero (to the factor's round-off) left of the diagonal, so earlier
            # columns stay as they are and column j itself becomes its dequantized value.
            w1 = w1 - err * u1[j : j + 1]
            if p1 is not None:
                w1 = w1 + col * p1[j : j + 1]
                pre.append(col)
            q_cols.append(q)
            errs.append(err)
        block_err = mx.concatenate(errs, axis=1)
        rest = rest[:, width:]
        if b1 < n_in:
            rest = rest - block_err @ u[b0:b1, b1:]
            if asymmetry is not None:
                rest = rest + mx.concatenate(pre, axis=1) @ asymmetry[b0:b1, b1:]
        codes.append(mx.concatenate(q_cols, axis=1).astype(mx.uint8))
        deq.append(w1)
        mx.eval(codes[-1], deq[-1], rest, all_scales[-1:], all_biases[-1:])
    return GPTQOutput(
        codes=mx.concatenate(codes, axis=1),
        scales=scales if scales is not None else mx.concatenate(all_scales, axis=1),
        biases=biases if biases is not None else mx.concatenate(all_biases, axis=1),
        dequantized=mx.concatenate(deq, axis=1),
    )
