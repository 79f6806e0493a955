"""Scaled dot-product attention in NumPy, for calibration passes on CPUs.

MLX's Linux CPU wheel computes ``mx.fast.scaled_dot_product_attention`` with netlib reference
BLAS (~6 GFLOP/s); a calibration pass over 32×256 tokens of a small llama spent more time there
than in all its linear layers. Same definition as MLX's (``softmax(scale · q kᵀ + mask) v``,
grouped-query heads, float32), NumPy's BLAS.
"""

from __future__ import annotations

import numpy as np

#: Float32 elements of one chunk of attention scores (8 MiB).
SCORE_CHUNK = 2 * 2**20


def attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                   mask: str | np.ndarray | None = None,
                   chunk: int = SCORE_CHUNK, out: np.ndarray | None = None) -> np.ndarray:
    """``softmax(scale · q kᵀ + mask) v`` for ``q (B, H, L, D)``, ``k (B, Hk, S, D)``,
    ``v (B, Hk, S, Dv)`` with ``H`` a multiple of ``Hk`` (query heads ``i·H/Hk …`` share kv
    head ``i``). ``mask``: ``None``; ``"causal"`` (query ``i`` sees keys ``j ≤ i + S − L``);
    a boolean array (``True``: attend) or an additive one, broadcastable to ``(B, H, L, S)``.
    Returns ``(B, H, L, Dv)`` float32 (written into ``out`` when given). Scores are computed
    ``chunk`` elements at a time (a batch row and a range of queries), in one work array
    reused for every chunk."""
    b, h, n_q, d = q.shape
    hk, n_k = k.shape[1], k.shape[2]
    rep = h // hk
    dv = v.shape[-1]
    if out is None:
        out = np.empty((b, h, n_q, dv), dtype=np.float32)
    elif out.shape != (b, h, n_q, dv) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array {(b, h, n_q, dv)}")
    step = max(1, min(n_q, chunk // max(1, h * n_k)))
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"mask must be None, 'causal' or an array, not {mask!r}")
    mask_arr = None if mask is None or causal else np.asarray(mask)
    if mask_arr is not None:
        mask_arr = mask_arr.reshape((1,) * (4 - mask_arr.ndim) + mask_arr.shape)
        mask_arr = np.broadcast_to(mask_arr, (*mask_arr.shape[:2], n_q, n_k))
    cols = np.arange(n_k)
    scores = np.empty((hk, rep, step, n_k), dtype=np.float32)
    queries = np.empty((hk, rep, step, d), dtype=np.float32)
    for i in range(b):
        ki_t = np.swapaxes(k[i][:, None], -1, -2)  # (Hk, 1, D, S)
        vi = v[i][:, None]  # (Hk, 1, S, Dv)
        out_i = out[i].reshape(hk, rep, n_q, dv)  # a view: out[i] is contiguous
        for start in range(0, n_q, step):
            stop = min(n_q, start + step)
            n = stop - start
            qi = np.multiply(q[i, :, start:stop].reshape(hk, rep, n, d), np.float32(scale),
                             out=queries[:, :, :n])
            s = np.matmul(qi, ki_t, out=scores[:, :, :n])  # (Hk, rep, l, S)
            if causal:
                rows = np.arange(start, stop)[:, None] + (n_k - n_q)
                np.copyto(s, np.float32(-np.inf), where=cols[None, :] > rows)
            elif mask_arr is not None:
                m = mask_arr[min(i, mask_arr.shape[0] - 1), :, start:stop]  # (H or 1, l, S)
                m = np.broadcast_to(m, (h, n, n_k)).reshape(hk, rep, n, n_k)
                if m.dtype == np.bool_:
                    np.copyto(s, np.float32(-np.inf), where=~m)
                else:
                    s += m
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            np.matmul(s, vi, out=out_i[:, :, start:stop])
    return out
