"""Damped Cholesky factors of inverse Hessians.

GPTQ needs ``U``, the upper Cholesky factor of ``H⁻¹`` (``UᵀU = H⁻¹``): row ``j`` of ``U``
spreads column ``j``'s rounding error over the columns after it. Backends:

* ``"numpy"``: float64 LAPACK, one Cholesky of the reversed matrix plus a triangular inverse
  (:mod:`.blocked_cholesky`); fast and robust on every CPU.
* ``"numpy-inv"``: the textbook route (Cholesky, inverse, Cholesky of the inverse) in float64.
* ``"mlx"``: the textbook route on MLX's CPU stream (netlib LAPACK on Linux wheels: slow).
* ``"blocked"``: blocked Cholesky and triangular inverse whose big updates are matmuls on the
  default device (the GPU), with only the diagonal blocks on the host; see
  :func:`.blocked_cholesky.blocked_factor_mlx`. Takes and returns MLX arrays.
* ``"auto"``: ``"numpy"`` when MLX's default device is the CPU, ``"blocked"`` on a GPU.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import FactorizationError
from .blocked_cholesky import reversed_factor_numpy


def prepare_hessian(h: np.ndarray, damping: float) -> tuple[np.ndarray, float, int]:
    """Float64 copy of ``h`` with dead inputs neutralised and ``damping · mean(diag)`` added to
    the diagonal. Returns ``(H, damp_value, n_dead)``.

    A dead input (zero diagonal: the column never saw a non-zero activation) gets a unit-scale
    diagonal entry, so it neither breaks the factorization nor receives error from other columns.
    """
    h = np.array(h, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(h)):
        raise FactorizationError("Hessian has NaN/Inf entries (non-finite calibration activations)")
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    live_mean = float(diag[~dead].mean()) if np.any(~dead) else 1.0
    idx = np.flatnonzero(dead)
    h[idx, :] = 0.0
    h[:, idx] = 0.0
    h[idx, idx] = live_mean
    damp = damping * live_mean
    h[np.diag_indices_from(h)] += damp
    return h, damp, int(dead.sum())


def _factor_numpy(h: np.ndarray) -> np.ndarray:
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.inv(lower)
        h_inv = lower_inv.T @ lower_inv
        u = np.linalg.cholesky(h_inv).T
    except np.linalg.LinAlgError as exc:
        raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
    return u


def _factor_mlx(h: np.ndarray) -> np.ndarray:
    with mx.stream(mx.cpu):
        a = mx.array(h.astype(np.float32))
        lower = mx.linalg.cholesky(a)
        h_inv = mx.linalg.cholesky_inv(lower)
        u = mx.linalg.cholesky(h_inv, upper=True)
        u_np = np.array(u, dtype=np.float64)
        low_diag = np.diagonal(np.array(lower))
    if not (np.all(np.isfinite(u_np)) and np.all(low_diag > 0) and np.all(np.diagonal(u_np) > 0)):
        raise FactorizationError("Cholesky factorization failed: matrix is not positive definite")
    return u_np


#: Backends working on float64 NumPy arrays (``"blocked"`` works on MLX arrays instead).
BACKENDS = {"numpy": reversed_factor_numpy, "numpy-inv": _factor_numpy, "mlx": _factor_mlx}
#: Every name a strategy accepts.
BACKEND_NAMES = (*BACKENDS, "blocked", "auto")


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for on this machine (``"auto"`` → ``"numpy"`` on CPU,
    ``"blocked"`` on a GPU)."""
    if name != "auto":
        return name
    return "numpy" if mx.default_device() == mx.cpu else "blocked"


def inverse_hessian_factor(h_damped: np.ndarray, backend: str = "numpy") -> np.ndarray:
    """Upper Cholesky factor of ``h_damped⁻¹`` (float64 NumPy array).

    Raises :class:`FactorizationError` when ``h_damped`` is not positive definite."""
    u = BACKENDS[backend](h_damped)
    if not np.all(np.isfinite(u)):
        raise FactorizationError("inverse Hessian factor has NaN/Inf entries")
    return u
