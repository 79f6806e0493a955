"""Inverse-Hessian factors without inverting the Hessian.

GPTQ needs ``U``, the upper Cholesky factor of ``H⁻¹`` (``UᵀU = H⁻¹``). Writing ``H = R Rᵀ``
with ``R = U⁻¹`` upper triangular shows that one Cholesky factorization of the reversed matrix
``J H J = L Lᵀ`` (``J`` reverses the order of rows/columns) and one triangular inverse give it:
``R = J L J`` and ``U = J L⁻¹ J``. That is ``n³/3 + n³/3`` flops, against about ``5 n³`` for
"Cholesky, invert, multiply, Cholesky again".

Two implementations:

* :func:`reversed_factor_numpy`: float64 LAPACK Cholesky plus a recursive triangular inverse whose
  work is matmuls (NumPy has no ``trtri``). For machines without a GPU.
* :func:`blocked_factor_mlx`: right-looking blocked Cholesky whose panel solves and trailing
  updates are matmuls on the default device (the GPU) and whose small diagonal blocks are
  factorized and inverted on the host in float64; then a blocked triangular inverse, again all
  matmuls. The host sees one ``nb × nb`` block at a time. MLX's GPUs have no float64 and its
  CUDA backend multiplies float32 in TF32, so on a GPU each matmul is a :func:`split_matmul`
  (four TF32 products, ~1e-6 relative): 0.5 s for n = 12288 on an H200 with errors ~1e-5
  against float64, where host LAPACK took 10.6 s.

Both take one matrix ``(n, n)`` or a stack ``(..., n, n)`` (the experts of a MoE layer: one
factorization of ``E`` matrices costs one pass of host round-trips instead of ``E``) and raise
:class:`FactorizationError` when a matrix is not positive definite (for a stack: when any is).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import FactorizationError


def _tri_inv_lower_numpy(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """Inverse of a lower-triangular matrix (or a stack of them, ``(..., n, n)``) by 2×2 block
    recursion (work in matmuls)."""
    n = lower.shape[-1]
    if n <= leaf:
        return np.linalg.inv(lower)
    k = n // 2
    a = _tri_inv_lower_numpy(lower[..., :k, :k], leaf)
    b = _tri_inv_lower_numpy(lower[..., k:, k:], leaf)
    out = np.zeros_like(lower)
    out[..., :k, :k] = a
    out[..., k:, k:] = b
    out[..., k:, :k] = -(b @ (lower[..., k:, :k] @ a))
    return out


def reversed_factor_numpy(h_damped: np.ndarray) -> np.ndarray:
    """``U`` (float64, upper) with ``UᵀU = h_damped⁻¹``, from one Cholesky factorization;
    ``h_damped``: ``(n, n)`` or a stack ``(..., n, n)``."""
    h = np.asarray(h_damped, dtype=np.float64)
    try:
        lower = np.linalg.cholesky(h[..., ::-1, ::-1])
    except np.linalg.LinAlgError as exc:
        raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
    return np.ascontiguousarray(_tri_inv_lower_numpy(lower)[..., ::-1, ::-1])


def _host_block_factor(a: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor of one diagonal block (or a stack of them) and its inverse, in float64
    on the host."""
    a64 = np.array(a, dtype=np.float64)
    a64 = 0.5 * (a64 + np.swapaxes(a64, -1, -2))
    try:
        lower = np.linalg.cholesky(a64)
    except np.linalg.LinAlgError as exc:
        raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
    return lower, _tri_inv_lower_numpy(lower)


def split_matmul(a: mx.array, b: mx.array) -> mx.array:
    """``a @ b`` to about 1e-6 relative in float32 on hardware that multiplies float32 in TF32
    (10-bit mantissa): each operand is split into a bfloat16-exact high part and a float32
    remainder, and the four partial products are summed (high parts multiply exactly)."""
    a_hi = a.astype(mx.bfloat16).astype(mx.float32)
    b_hi = b.astype(mx.bfloat16).astype(mx.float32)
    a_lo, b_lo = a - a_hi, b - b_hi
    return a_hi @ b_hi + ((a_hi @ b_lo + a_lo @ b_hi) + a_lo @ b_lo)


def _matmul_for(a: mx.array, split: bool):
    if split and a.dtype == mx.float32:
        return split_matmul
    return mx.matmul


def _t(a: mx.array) -> mx.array:
    """Transpose of the last two axes."""
    return a.swapaxes(-1, -2)


def blocked_cholesky_mlx(
    a: mx.array, block: int = 1024, split: bool = False
) -> tuple[list[mx.array], list[mx.array]]:
    """Right-looking blocked Cholesky of ``a`` (symmetric positive definite, ``(n, n)`` or a
    stack ``(..., n, n)``), in ``a``'s dtype.

    Returns the column panels of ``L`` (panel ``k`` is ``L[..., k·nb:, k·nb:(k+1)·nb]``) and the
    inverses of the diagonal blocks ``L_kk⁻¹``, all arrays on the default device."""
    n = a.shape[-1]
    np_dtype = np.float64 if a.dtype == mx.float64 else np.float32
    mm = _matmul_for(a, split)
    panels: list[mx.array] = []
    diag_inv: list[mx.array] = []
    rest = a
    for k in range(0, n, block):
        m = min(block, n - k)
        l11, l11_inv = _host_block_factor(rest[..., :m, :m])
        l11_inv_mx = mx.array(l11_inv.astype(np_dtype))
        l11_mx = mx.array(l11.astype(np_dtype))
        if k + m < n:
            l21 = mm(rest[..., m:, :m], _t(l11_inv_mx))
            rest = rest[..., m:, m:] - mm(l21, _t(l21))
            panels.append(mx.concatenate([l11_mx, l21], axis=-2))
        else:
            panels.append(l11_mx)
        diag_inv.append(l11_inv_mx)
        # The next diagonal block is read on the host: evaluating here keeps the graph short.
        mx.eval(rest, panels[-1])
    return panels, diag_inv


def blocked_tri_inv_mlx(
    panels: list[mx.array], diag_inv: list[mx.array], split: bool = False
) -> mx.array:
    """``L⁻¹`` from :func:`blocked_cholesky_mlx`'s panels, by block rows:
    ``X_i,:i = -L_ii⁻¹ (L_i,:i X_:i,:i)``. All matmuls on the default device."""
    sizes = [d.shape[-1] for d in diag_inv]
    starts = np.cumsum([0, *sizes])
    n = int(starts[-1])
    mm = _matmul_for(diag_inv[0], split)
    batch = [(0, 0)] * (diag_inv[0].ndim - 1)  # no padding of the leading axes and the rows
    x_top: mx.array | None = None  # X[..., :k, :k], lower triangular
    for i, (s, m) in enumerate(zip(starts[:-1], sizes, strict=True)):
        s = int(s)
        if i == 0:
            row = diag_inv[0]
        else:
            # L[..., s:s+m, :s], gathered from the panels to the left.
            l_row = mx.concatenate(
                [p[..., s - int(starts[j]) : s - int(starts[j]) + m, :]
                 for j, p in enumerate(panels[:i])],
                axis=-1,
            )
            left = -mm(diag_inv[i], mm(l_row, x_top))
            row = mx.concatenate([left, diag_inv[i]], axis=-1)
        x_top = row if x_top is None else mx.concatenate(
            [mx.pad(x_top, [*batch, (0, m)]), row], axis=-2
        )
        if i % 8 == 7:  # keep the lazy graph short; no host round-trip is needed here
            mx.eval(x_top)
    assert x_top is not None and x_top.shape[-2:] == (n, n)
    return x_top


def blocked_factor_mlx(
    h_damped: mx.array, block: int = 512, dtype: mx.Dtype = mx.float32,
    split: bool | None = None,
) -> mx.array:
    """``U`` (float32, upper) with ``UᵀU = h_damped⁻¹`` on the default device (see module doc);
    ``h_damped``: ``(n, n)`` or a stack ``(..., n, n)``, factorized together (one host round-trip
    per diagonal block for the whole stack).

    Only ``block × block`` diagonal blocks travel to the host; everything else is matmuls in
    ``dtype``. MLX's CUDA backend multiplies float32 matrices in TF32 (relative error ~3e-4,
    measured on an H200; float64 is not supported on its GPU), too coarse for a factorization:
    ``split`` (default: on a GPU) makes every float32 matmul a :func:`split_matmul`."""
    if split is None:
        split = mx.default_device() != mx.cpu
    a = h_damped.astype(dtype)[..., ::-1, ::-1]
    panels, diag_inv = blocked_cholesky_mlx(a, block, split)
    x = blocked_tri_inv_mlx(panels, diag_inv, split)
    u = x[..., ::-1, ::-1].astype(mx.float32)
    # A contiguous copy: later slicing of u should not carry the reversed strides around.
    u = mx.contiguous(u) if hasattr(mx, "contiguous") else u + 0
    mx.eval(u)
    if not bool(mx.all(mx.isfinite(u)).item()):
        raise FactorizationError("inverse Hessian factor has NaN/Inf entries")
    return u


def prepare_hessians_mlx(h: mx.array, damping: float) -> tuple[mx.array, np.ndarray, np.ndarray]:
    """:func:`quantkit.kernels.linalg.prepare_hessians` on the default device (float32), for a
    stack ``h (E, n, n)``: in each matrix, dead inputs get a unit-scale diagonal and no coupling
    and ``damping · mean(live diag)`` is added to the diagonal. Returns ``(H, damp_value (E,),
    n_dead (E,))``, the last two NumPy arrays."""
    h = h.astype(mx.float32)
    if not bool(mx.all(mx.isfinite(h)).item()):
        raise FactorizationError("Hessian has NaN/Inf entries (non-finite calibration activations)")
    n = h.shape[-1]
    diag = mx.diagonal(h, axis1=-2, axis2=-1)
    dead = diag <= 0
    n_dead_mx = mx.sum(dead, axis=-1)
    live_sum = mx.sum(mx.where(dead, 0.0, diag), axis=-1)
    live_mx = live_sum / mx.maximum(n - n_dead_mx, 1).astype(mx.float32)
    n_dead = np.array(n_dead_mx).astype(np.int64)
    live_mean = np.where(n_dead < n, np.array(live_mx).astype(np.float64), 1.0)
    damp = damping * live_mean
    if n_dead.any():
        keep = mx.logical_not(dead).astype(mx.float32)
        h = h * keep[..., :, None] * keep[..., None, :]
        diag_add = mx.where(dead, mx.array(live_mean.astype(np.float32))[:, None], 0.0)
    else:
        diag_add = mx.zeros(diag.shape, dtype=mx.float32)
    eye_scale = (diag_add + mx.array(damp.astype(np.float32))[:, None]).astype(mx.float32)
    h = h + eye_scale[..., :, None] * mx.eye(n, dtype=mx.float32)
    return h, damp, n_dead


def prepare_hessian_mlx(h: mx.array, damping: float) -> tuple[mx.array, float, int]:
    """:func:`prepare_hessians_mlx` of one matrix ``(n, n)``: ``(H, damp_value, n_dead)``."""
    hs, damp, n_dead = prepare_hessians_mlx(h[None], damping)
    return hs[0], float(damp[0]), int(n_dead[0])
