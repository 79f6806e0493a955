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
    per_row = codes.size // codes.shape[0] if codes.ndim >= 2 and codes.shape[0] else 1
    rows = (1 << 24) // max(1, per_row * bits)  # the bit stream below is 4·bits bytes per code
    if codes.ndim >= 2 and codes.shape[0] > rows > 0:
        # Chunk the leading axis so the temporary stream stays ~64 MB (an lm_head's is GBs).
        parts = [pack_bits(codes[i : i + rows], bits) for i in range(0, codes.shape[0], rows)]
        for part in parts:
            mx.eval(part)
        return mx.concatenate(parts, axis=0)
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
