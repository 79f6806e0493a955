"""MLX's float formats (``mxfp4``, ``nvfp4``, ``mxfp8``) as pure functions, and GPTQ on them.

Each group of ``group_size`` consecutive inputs shares one 8-bit scale; each weight is a small
float code. ``mxfp4``: E2M1 codes, group 32, power-of-two (E8M0) scales. ``nvfp4``: E2M1 codes,
group 16, E4M3 scales. ``mxfp8``: E4M3 codes, group 32, E8M0 scales. The codes are packed with
the same little-endian bit stream as affine codes (:func:`~quantkit.kernels.packing.pack_bits`),
which is what ``mx.dequantize`` reads.

GPTQ here keeps the group scales ``mx.quantize`` picks for the original weights (static groups:
an E8M0 scale cannot follow small changes anyway) and rounds column by column onto the format's
grid, feeding each column's error forward exactly as the affine kernel does.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import mlx.core as mx

from .packing import pack_bits

#: mode -> (element format, scale format, bits per code)
FLOAT_FORMATS: dict[str, tuple[str, str, int]] = {
    "mxfp4": ("e2m1", "e8m0", 4),
    "nvfp4": ("e2m1", "e4m3", 4),
    "mxfp8": ("e4m3", "e8m0", 8),
}

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E4M3_MAX = 448.0


def decode_scales(scales: mx.array, mode: str) -> mx.array:
    """Float32 values of stored uint8 group scales."""
    if FLOAT_FORMATS[mode][1] == "e8m0":
        return mx.power(2.0, scales.astype(mx.float32) - 127.0)
    return mx.from_fp8(scales, dtype=mx.float32)


def round_to_grid(x: mx.array, mode: str) -> tuple[mx.array, mx.array]:
    """Nearest representable element values of ``x`` (already divided by its scale), as
    ``(codes uint8, values float32)``; out-of-range values saturate."""
    if FLOAT_FORMATS[mode][0] == "e4m3":
        codes = mx.to_fp8(mx.clip(x.astype(mx.float32), -_E4M3_MAX, _E4M3_MAX))
        return codes, mx.from_fp8(codes, dtype=mx.float32)
    a = mx.abs(x)
    idx = mx.sum(a[..., None] > mx.array(_E2M1_MIDPOINTS), axis=-1).astype(mx.uint8)
    negative = x < 0
    values = mx.array(_E2M1)[idx]
    codes = idx | (negative.astype(mx.uint8) << 3)
    return codes, mx.where(negative, -values, values)


def float_scales(w: mx.array, mode: str, group_size: int) -> mx.array:
    """The uint8 group scales ``mx.quantize`` chooses for ``w``."""
    bits = FLOAT_FORMATS[mode][2]
    return mx.quantize(w, group_size=group_size, bits=bits, mode=mode)[1]


def float_quantize(
    w: mx.array, scales: mx.array, mode: str
) -> tuple[mx.array, mx.array]:
    """Round to nearest with given uint8 group scales: ``(codes, dequantized float32)``."""
    group_size = w.shape[-1] // scales.shape[-1]
    s = mx.repeat(decode_scales(scales, mode), group_size, axis=-1)
    codes, values = round_to_grid(w.astype(mx.float32) / _nonzero(s), mode)
    return codes, values * s


def _quantize_column(
    col: mx.array, s: mx.array, s_safe: mx.array, u_jj: mx.array, mode: str
) -> tuple[mx.array, mx.array, mx.array]:
    """Codes, values and rounding error divided by ``u_jj`` of one column ``col (out, 1)``
    with group scales ``s`` (``s_safe``: zeros replaced by ones)."""
    q, v = round_to_grid(col / s_safe, mode)
    v = v * s
    return q, v, (col - v) / u_jj


# One fused step per column (see :mod:`.gptq`); traced once per column height and mode.
_quantize_column_fused = mx.compile(_quantize_column)


def float_pack(codes: mx.array, mode: str) -> mx.array:
    """uint32 words ``mx.dequantize`` reads for ``mode``."""
    return pack_bits(codes, FLOAT_FORMATS[mode][2])


def _nonzero(s: mx.array) -> mx.array:
    # An all-zero nvfp4 group has scale 0: every code dequantizes to 0, any code will do.
    return mx.where(s == 0, mx.ones_like(s), s)


@attrs.frozen
class FloatGPTQOutput:
    codes: mx.array  # (out, in) uint8 element codes
    scales: mx.array  # (out, in // group_size) uint8, as given
    dequantized: mx.array  # (out, in) float32


def gptq_quantize_float(
    w: mx.array,
    u: mx.array,
    scales: mx.array,
    *,
    mode: str,
    block_size: int = 128,
    group_index: Sequence[int] | None = None,
) -> FloatGPTQOutput:
    """GPTQ error feedback onto the grid of float format ``mode`` with fixed uint8 ``scales``.

    ``u``: upper Cholesky factor of the damped ``H⁻¹``; ``group_index``: the group of each column
    of ``w`` in the order given (default ``j // group_size``, as for the affine kernel)."""
    n_out, n_in = w.shape
    group_size = n_in // scales.shape[-1]
    if group_index is None:
        group_index = [j // group_size for j in range(n_in)]
    s_all = decode_scales(scales, mode)
    s_safe = _nonzero(s_all)
    u = u.astype(mx.float32)
    rest = w.astype(mx.float32)
    codes, deq = [], []
    for b0 in range(0, n_in, block_size):
        b1 = min(b0 + block_size, n_in)
        width = b1 - b0
        w1 = rest[:, :width]
        u1 = u[b0:b1, b0:b1]
        q_cols, v_cols, errs = [], [], []
        for j in range(width):
            g = group_index[b0 + j]
            q, v, err = _quantize_column_fused(w1[:, j : j + 1], s_all[:, g : g + 1],
                                               s_safe[:, g : g + 1], u1[j, j], mode)
            w1 = w1 - err * u1[j : j + 1]
            q_cols.append(q)
            v_cols.append(v)
            errs.append(err)
        rest = rest[:, width:]
        if b1 < n_in:
            rest = rest - mx.concatenate(errs, axis=1) @ u[b0:b1, b1:]
        codes.append(mx.concatenate(q_cols, axis=1))
        deq.append(mx.concatenate(v_cols, axis=1))
        mx.eval(codes[-1], deq[-1], rest)
    return FloatGPTQOutput(
        codes=mx.concatenate(codes, axis=1),
        scales=scales,
        dequantized=mx.concatenate(deq, axis=1),
    )
