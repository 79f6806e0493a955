"""MLX's bit layout for affine codes: a little-endian bit stream in uint32 words.

Each row of ``bits``-wide codes is concatenated lowest bit first and cut into 32-bit words; for
2/4/8 bits this is ``32 // bits`` codes per word, for 3/5/6 bits codes straddle word
boundaries. This is the layout ``mx.quantize`` writes and ``mx.dequantize`` reads.
"""

from __future__ import annotations

import mlx.core as mx


def pack_bits(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes ``(..., n)`` into uint32 words ``(..., n * bits // 32)``."""
    n = codes.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"row of {n} codes at {bits} bits does not fill whole 32-bit words")
    lead = codes.shape[:-1]
    c = codes.astype(mx.uint32)
    shifts = mx.arange(bits, dtype=mx.uint32)
    stream = (c[..., None] >> shifts) & 1  # (..., n, bits), lowest bit first
    stream = stream.reshape(*lead, n * bits // 32, 32)
    weights = mx.arange(32, dtype=mx.uint32)
    return mx.sum(stream << weights, axis=-1).astype(mx.uint32)


def unpack_bits(words: mx.array, bits: int) -> mx.array:
    """Inverse of :func:`pack_bits`: uint32 words ``(..., m)`` to uint8 codes ``(..., 32m/bits)``."""
    lead = words.shape[:-1]
    m = words.shape[-1]
    stream = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    stream = stream.reshape(*lead, m * 32 // bits, bits)
    return mx.sum(stream << mx.arange(bits, dtype=mx.uint32), axis=-1).astype(mx.uint8)
