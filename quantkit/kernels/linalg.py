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

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..errors import FactorizationError
from .blocked_cholesky import reversed_factor_numpy


def prepare_hessians(h: np.ndarray, damping: float, perm: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 copy of a stack ``h (E, n, n)`` with, in each matrix, dead inputs neutralised and
    ``damping · mean(diag)`` added to the diagonal. Returns ``(H, damp_value (E,), n_dead (E,))``.
    ``perm``: the copy is of ``h[:, perm][:, :, perm]`` (rows and columns permuted), made a
    block of rows at a time: no permuted copy of ``h`` besides the float64 one.

    A dead input (zero diagonal: the column never saw a non-zero activation) gets a unit-scale
    diagonal entry, so it neither breaks the factorization nor receives error from other columns.
    """
    if perm is None:
        h = np.array(h, dtype=np.float64, copy=True)
    else:
        out = np.empty(h.shape, dtype=np.float64)
        for e in range(len(h)):
            for a in range(0, len(perm), 256):
                out[e, a : a + 256] = h[e][perm[a : a + 256]][:, perm]
        h = out
    if not np.all(np.isfinite(h)):
        raise FactorizationError("Hessian has NaN/Inf entries (non-finite calibration activations)")
    diag = np.diagonal(h, axis1=-2, axis2=-1).copy()
    dead = diag <= 0
    live_mean = np.ones(len(h))
    for e in range(len(h)):  # E small steps, in place (no stack-sized temporaries)
        idx = np.flatnonzero(dead[e])
        if len(idx) < h.shape[-1]:
            live_mean[e] = diag[e][~dead[e]].mean()
        h[e, idx, :] = 0.0
        h[e, :, idx] = 0.0
    damp = damping * live_mean
    rows = np.arange(h.shape[-1])
    h[:, rows, rows] = np.where(dead, live_mean[:, None], diag) + damp[:, None]
    return h, damp, np.sum(dead, axis=-1)


def prepare_hessian(h: np.ndarray, damping: float) -> tuple[np.ndarray, float, int]:
    """:func:`prepare_hessians` of one matrix ``(n, n)``: ``(H, damp_value, n_dead)``."""
    hs, damp, n_dead = prepare_hessians(np.asarray(h)[None], damping)
    return hs[0], float(damp[0]), int(n_dead[0])


def _factor_numpy(h: np.ndarray) -> np.ndarray:
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.inv(lower)
        h_inv = np.swapaxes(lower_inv, -1, -2) @ lower_inv
        u = np.swapaxes(np.linalg.cholesky(h_inv), -1, -2)
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
        low_diag = np.diagonal(np.array(lower), axis1=-2, axis2=-1)
    if not (np.all(np.isfinite(u_np)) and np.all(low_diag > 0)
            and np.all(np.diagonal(u_np, axis1=-2, axis2=-1) > 0)):
        raise FactorizationError("Cholesky factorization failed: matrix is not positive definite")
    return u_np


#: Backends working on float64 NumPy arrays (``"blocked"`` works on MLX arrays instead).
BACKENDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "numpy": reversed_factor_numpy, "numpy-inv": _factor_numpy, "mlx": _factor_mlx}
#: Every name a strategy accepts.
BACKEND_NAMES = (*BACKENDS, "blocked", "auto")


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for on this machine (``"auto"`` → ``"numpy"`` on CPU,
    ``"blocked"`` on a GPU)."""
    if name != "auto":
        return name
    return "numpy" if mx.default_device() == mx.cpu else "blocked"


def inverse_hessian_factor(h_damped: np.ndarray, backend: str = "numpy",
                           overwrite: bool = False) -> np.ndarray:
    """Upper Cholesky factor of ``h_damped⁻¹`` (float64 NumPy array), of one matrix ``(n, n)``
    or of each matrix of a stack ``(..., n, n)``.

    ``overwrite``: the caller no longer needs ``h_damped`` (C-contiguous float64), and the
    ``"numpy"`` backend may compute the factor in its memory (the result is then that array).

    Raises :class:`FactorizationError` when ``h_damped`` (any matrix of it) is not positive
    definite."""
    u = reversed_factor_numpy(h_damped, overwrite) if backend == "numpy" else BACKENDS[backend](h_damped)
    if not all(np.all(np.isfinite(m)) for m in u.reshape(-1, u.shape[-1])):  # no n² mask
        raise FactorizationError("inverse Hessian factor has NaN/Inf entries")
    return u
