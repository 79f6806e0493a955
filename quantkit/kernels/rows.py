"""Row chunks: tall matrices a slice of output rows at a time.

GPTQ treats every output row on its own once the inverse-Hessian factor is known, and the
Hessian-weighted error figures are sums over rows. An output head (151936 rows) can therefore be
done in slices of rows whose float32 working set stays under a budget, instead of holding
several full-size float32 copies (weights, updated rest, dequantized values, errors) at once.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

#: Default float32 working set of one chunk of rows, in bytes.
CHUNK_BYTES = 256 * 2**20
#: Float32 copies of a chunk's rows a GPTQ column loop holds at once (input, updated rest,
#: dequantized values, errors, host copies of the NumPy path).
WORKING_COPIES = 6
#: Fewest rows in a chunk: the CUDA column loop runs one warp per row, and a GPU needs thousands
#: of rows to be busy (a layer of up to this many rows is never split).
MIN_ROWS = 8192


def rows_per_chunk(n_rows: int, n_cols: int, budget_bytes: int = CHUNK_BYTES,
                   copies: int = WORKING_COPIES, min_rows: int = MIN_ROWS) -> int:
    """Rows whose ``copies`` float32 copies of ``n_cols`` values fit in ``budget_bytes``, but
    at least ``min_rows`` (and one) and at most ``n_rows``."""
    rows = budget_bytes // max(1, copies * 4 * n_cols)
    return max(1, min(n_rows, max(rows, min_rows)))


def row_slices(n_rows: int, chunk: int) -> list[slice]:
    """Consecutive slices of ``chunk`` rows covering ``n_rows`` (the last may be shorter)."""
    return [slice(r0, min(r0 + chunk, n_rows)) for r0 in range(0, n_rows, max(1, chunk))]


def map_rows(fn: Callable[[slice], dict[str, mx.array]], n_rows: int,
             chunk: int) -> dict[str, mx.array]:
    """``fn(rows)`` for consecutive slices of ``chunk`` rows, gathered into full-size arrays.

    ``fn`` returns arrays whose leading axis is the slice's rows; each is written into its
    full-size output in place and evaluated chunk by chunk, so only the outputs and one chunk's
    working set are alive at once (concatenating the pieces would hold them all plus the full
    copy). With ``chunk >= n_rows``, ``fn(slice(0, n_rows))`` unchanged."""
    if chunk >= n_rows:
        return fn(slice(0, n_rows))
    out: dict[str, mx.array] = {}
    for rows in row_slices(n_rows, chunk):
        part = fn(rows)
        if not out:
            out = {k: mx.zeros((n_rows, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][rows] = v
        del part
        mx.eval(out)
    return out
