"""Float64 NumPy references of the kernels, written from the papers' descriptions.

Used as oracles: the MLX kernels must agree with these to tolerance."""

from __future__ import annotations

import numpy as np


def affine_params_ref(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's affine rule: the group edge of larger magnitude is represented exactly."""
    g = w.reshape(*w.shape[:-1], -1, group_size)
    lo, hi = g.min(-1), g.max(-1)
    n = 2**bits - 1
    scale = np.maximum((hi - lo) / n, 1e-7)
    if bits == 1:
        return scale, lo
    low_edge = np.abs(lo) > np.abs(hi)
    scale = np.where(low_edge, scale, -scale)
    edge = np.where(low_edge, lo, hi)
    q0 = np.round(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 == 0, 1, q0), scale)
    bias = np.where(q0 == 0, 0.0, edge)
    return scale, bias


def gptq_ref(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, damping: float = 0.01):
    """GPTQ (Frantar et al. 2022, Alg. 1) without lazy batching: quantize column j, then update
    every later column with ``err_j · U[j, j:]`` where ``UᵀU = (H + λI)⁻¹``. Group parameters are
    chosen when a group's first column is reached. Returns ``(codes, dequantized)``."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    n = h.shape[0]
    h = h + damping * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    n_levels = 2**bits - 1
    codes = np.zeros(w.shape, dtype=np.int64)
    deq = np.zeros_like(w)
    for j in range(n):
        if j % group_size == 0:
            s, b = affine_params_ref(w[:, j : j + group_size], bits, group_size)
            s, b = s[:, 0], b[:, 0]
        q = np.clip(np.round((w[:, j] - b) / s), 0, n_levels)
        codes[:, j] = q
        deq[:, j] = q * s + b
        err = (w[:, j] - deq[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return codes, deq


def hessian_error_ref(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("ij,jk,ik->", d, np.asarray(h, np.float64), d))
