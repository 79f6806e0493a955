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
                    chunk: int = SCORE_CHUNK) -> np.ndarray:
    """``softmax(scale · q kᵀ + mask) v`` for ``q (B, H, L, D)``, ``k (B, Hk, S, D)``,
    ``v (B, Hk, S, Dv)`` with ``H`` a multiple of ``Hk`` (query heads ``i·H/Hk …`` share kv
    head ``i``). ``mask``: ``None``; ``"causal"`` (query ``i`` sees keys ``j ≤ i + S − L``);
    a boolean array (``True``: attend) or an additive one, broadcastable to ``(B, H, L, S)``.
    Returns ``(B, H, L, Dv)`` float32. Scores are computed ``chunk`` elements at a time (a
    batch row and a range of queries)."""
    b, h, n_q, d = q.shape
    hk, n_k = k.shape[1], k.shape[2]
    rep = h // hk
    out = np.empty((b, h, n_q, v.shape[-1]), dtype=np.float32)
    step = max(1, min(n_q, chunk // max(1, h * n_k)))
    causal = isinstance(mask, str)
    if causal and mask != "causal":
        raise ValueError(f"mask must be None, 'causal' or an array, not {mask!r}")
    mask_arr = None if mask is None or causal else np.asarray(mask)
    if mask_arr is not None:
        mask_arr = mask_arr.reshape((1,) * (4 - mask_arr.ndim) + mask_arr.shape)
        mask_arr = np.broadcast_to(mask_arr, (*mask_arr.shape[:2], n_q, n_k))
    cols = np.arange(n_k)
    for i in range(b):
        ki = k[i][:, None]  # (Hk, 1, S, D)
        vi = v[i][:, None]
        for start in range(0, n_q, step):
            stop = min(n_q, start + step)
            qi = q[i, :, start:stop].reshape(hk, rep, stop - start, d) * np.float32(scale)
            s = qi @ np.swapaxes(ki, -1, -2)  # (Hk, rep, l, S)
            if causal:
                rows = np.arange(start, stop)[:, None] + (n_k - n_q)
                s = np.where(cols[None, :] <= rows, s, np.float32(-np.inf))
            elif mask_arr is not None:
                m = mask_arr[min(i, mask_arr.shape[0] - 1), :, start:stop]  # (H or 1, l, S)
                m = np.broadcast_to(m, (h, stop - start, n_k)).reshape(hk, rep, stop - start, n_k)
                s = np.where(m, s, np.float32(-np.inf)) if m.dtype == np.bool_ else s + m
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[i, :, start:stop] = (s @ vi).reshape(h, stop - start, -1)
    return out
