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
  (four TF32 products, ~1e-6 relative): 0.73 s for n = 12288 on an H200 with errors ~1e-5
  against float64, where host LAPACK took 10.6–14.4 s.

Both take one matrix ``(n, n)`` or a stack ``(..., n, n)`` (the experts of a MoE layer: one
factorization of ``E`` matrices costs one pass of host round-trips instead of ``E``) and raise
:class:`FactorizationError` when a matrix is not positive definite (for a stack: when any is).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TypeVar

import mlx.core as mx
import numpy as np

from ..errors import FactorizationError
from .lapack import cholesky_lower_inplace, cholesky_of_lower, tri_inv_lower

_R = TypeVar("_R")


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


def _tri_inv_lower_inplace(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """:func:`_tri_inv_lower_numpy` written over ``lower`` (one ``(n, n)`` matrix or a view of
    one): the same products on the same values, so the same result bit for bit, with
    ``(n/2)²`` temporaries (~0.5 n² at the top level) instead of a second ``n²`` matrix and the
    recursion's copies."""
    n = lower.shape[-1]
    if n <= leaf:
        lower[...] = np.linalg.inv(lower)
        return lower
    k = n // 2
    _tri_inv_lower_inplace(lower[:k, :k], leaf)
    _tri_inv_lower_inplace(lower[k:, k:], leaf)
    t = lower[k:, :k] @ lower[:k, :k]  # L21 @ inv(L11), before L21 is overwritten
    np.matmul(lower[k:, k:], t, out=lower[k:, :k])
    np.negative(lower[k:, :k], out=lower[k:, :k])
    return lower


def _reverse_inplace(a: np.ndarray, rows: int = 64) -> None:
    """``a[...] = a[::-1, ::-1]`` for a square matrix, a few rows at a time (no ``n²`` copy)."""
    n = a.shape[-1]
    half = n // 2
    for i in range(0, half, rows):
        c = min(rows, half - i)
        top = a[i:i + c].copy()
        a[i:i + c] = a[n - i - c:n - i][::-1, ::-1]
        a[n - i - c:n - i] = top[::-1, ::-1]
    if n % 2:
        a[half] = a[half, ::-1].copy()


def reversed_factor_numpy(h_damped: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """``U`` (float64, upper) with ``UᵀU = h_damped⁻¹``, from one Cholesky factorization;
    ``h_damped``: ``(n, n)`` or a stack ``(..., n, n)``.

    ``overwrite``: ``h_damped`` (C-contiguous float64) may be used as the work space and holds
    ``U`` on return (the same values): one ``n²`` float64 matrix plus a quarter-size temporary
    instead of four or five (NumPy's Cholesky copies, the triangular inverse's output and the
    reversed copy), see :mod:`.lapack`."""
    h = np.asarray(h_damped, dtype=np.float64)
    if overwrite and h is h_damped and h.flags.c_contiguous:
        try:
            for m in h.reshape(-1, *h.shape[-2:]):
                _reverse_inplace(m)
                cholesky_lower_inplace(m)
                _tri_inv_lower_inplace(m)
                _reverse_inplace(m)
        except np.linalg.LinAlgError as exc:
            raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
        return h
    try:
        lower = np.linalg.cholesky(h[..., ::-1, ::-1])
    except np.linalg.LinAlgError as exc:
        raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
    return np.ascontiguousarray(_tri_inv_lower_numpy(lower)[..., ::-1, ::-1])


def _host_block_factor(a: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factor of one diagonal block (or a stack of them) and its inverse, in float64
    on the host: LAPACK's ``dpotrf`` on the block's lower triangle (the blocked factorization
    only ever updates and reads that one) in place and ``dtrtri``, where NumPy's LAPACK has
    them (:mod:`.lapack`; a third of the flops of the recursive inverse, which stays the
    fallback)."""
    a64 = np.array(a, dtype=np.float64)
    try:
        lower = cholesky_of_lower(a64)
        inverse = tri_inv_lower(lower)
    except np.linalg.LinAlgError as exc:
        raise FactorizationError(f"Cholesky factorization failed: {exc}") from exc
    return lower, _tri_inv_lower_numpy(lower) if inverse is None else inverse


def _parts(a: mx.array, split: bool) -> tuple[mx.array, ...]:
    """``a`` as the terms :func:`_product` multiplies: ``(a,)``, or with ``split`` a
    bfloat16-exact high part and the float32 remainder. Elementwise, so the parts of a slice
    are the slices of the parts."""
    if not split:
        return (a,)
    hi = a.astype(mx.bfloat16).astype(mx.float32)
    return hi, a - hi


def _product(a: tuple[mx.array, ...], b: tuple[mx.array, ...]) -> mx.array:
    """``a @ b`` of two operands given as :func:`_parts`."""
    if len(a) == 1:
        return a[0] @ b[0]
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    return a_hi @ b_hi + ((a_hi @ b_lo + a_lo @ b_hi) + a_lo @ b_lo)


def split_matmul(a: mx.array, b: mx.array) -> mx.array:
    """``a @ b`` to about 1e-6 relative in float32 on hardware that multiplies float32 in TF32
    (10-bit mantissa): each operand is split into a bfloat16-exact high part and a float32
    remainder, and the four partial products are summed (high parts multiply exactly)."""
    return _product(_parts(a, True), _parts(b, True))


def _t(a: mx.array) -> mx.array:
    """Transpose of the last two axes."""
    return a.swapaxes(-1, -2)


def _blocks(n: int, block: int) -> tuple[list[int], list[int]]:
    """Starts and sizes of the diagonal blocks of an ``n``-wide matrix."""
    starts = list(range(0, n, block))
    return starts, [min(block, n - s) for s in starts]


#: One step of a factorization run as a generator (:func:`run_together`): it yields the arrays
#: it is about to read on the host (or to wait for), and returns its result.
Steps = Generator[list[mx.array], None, _R]


def run_together(steps: Sequence[Steps]) -> list:
    """Run several factorizations in lockstep: each runs up to the point where it needs arrays
    evaluated (a diagonal block to read on the host, a block column to finish), those of all of
    them are evaluated by one ``mx.eval``, and each goes on. The same operations as running them
    one after the other, so the same values, with one wait for the device per step instead of
    one per step of each; the first exception raised by any of them propagates."""
    out: list = [None] * len(steps)
    live = list(range(len(steps)))
    while live:
        wanted: list[mx.array] = []
        going = []
        for i in live:
            try:
                wanted.extend(next(steps[i]))
                going.append(i)
            except StopIteration as stop:
                out[i] = stop.value
        if wanted:
            mx.eval(wanted)
        live = going
    return out


def cholesky_steps(a: mx.array, block: int = 1024, split: bool = False
                   ) -> Steps[tuple[list[mx.array], list[mx.array]]]:
    """Right-looking blocked Cholesky of ``a`` (symmetric positive definite, ``(n, n)`` or a
    stack ``(..., n, n)``), in ``a``'s dtype, as :data:`Steps` (the first half of :func:`factor_steps`).

    Returns the column panels of ``L`` (panel ``k`` is ``L[..., k·nb:, k·nb:(k+1)·nb]``) and the
    inverses of the diagonal blocks ``L_kk⁻¹``, all arrays on the default device.

    Memory: the trailing matrix is kept as its lower column panels (it is symmetric, and only
    its lower part is read), each updated by its own product, so the panels of ``L`` and of the
    trailing matrix together hold about ``n²/2`` values and a step's temporaries are one
    panel's products (a full trailing update held several ``n²`` arrays at once)."""
    n = a.shape[-1]
    np_dtype = np.float64 if a.dtype == mx.float64 else np.float32
    split = split and a.dtype == mx.float32
    starts, sizes = _blocks(n, block)
    # cols[j]: A[..., s_j:, s_j:s_j+m_j] with every step so far applied.
    cols: list[mx.array | None] = [a[..., s:, s : s + m] for s, m in zip(starts, sizes)]
    panels: list[mx.array] = []
    diag_inv: list[mx.array] = []
    for k, (s, m) in enumerate(zip(starts, sizes)):
        col, cols[k] = cols[k], None
        diag = col[..., :m, :m]
        yield [diag]  # read on the host next
        l11, l11_inv = _host_block_factor(diag)
        l11_inv_mx = mx.array(l11_inv.astype(np_dtype))
        l11_mx = mx.array(l11.astype(np_dtype))
        if s + m < n:
            l21 = _product(_parts(col[..., m:, :], split), _parts(_t(l11_inv_mx), split))
            l21_parts = _parts(l21, split)
            for j in range(k + 1, len(starts)):
                off = starts[j] - s - m  # row of l21 where panel j's rows begin
                rows = tuple(x[..., off:, :] for x in l21_parts)
                cols_t = tuple(_t(x[..., off : off + sizes[j], :]) for x in l21_parts)
                cols[j] = cols[j] - _product(rows, cols_t)
                if j == k + 1:
                    # Look-ahead: the next column first, so that its diagonal block reaches
                    # the host while the device updates the columns after it.
                    mx.async_eval(cols[j])
            panels.append(mx.concatenate([l11_mx, l21], axis=-2))
        else:
            panels.append(l11_mx)
        diag_inv.append(l11_inv_mx)
        del col, diag
        # Scheduled, not awaited (evaluating each step keeps the graph short); the host waits
        # only when it reads the next diagonal block.
        mx.async_eval(cols[k + 1 :], panels[-1])
    return panels, diag_inv


def inverse_factor_steps(panels: list[mx.array | None], diag_inv: list[mx.array],
                         split: bool = False) -> Steps[mx.array]:
    """``U = J L⁻¹ J`` (float32, contiguous) from :func:`cholesky_steps`'s panels, one
    block column ``X_:,j`` of ``X = L⁻¹`` at a time by forward substitution,
    ``X_ij = -L_ii⁻¹ Σ_{j≤t<i} L_it X_tj``, the sums accumulated right-looking (``L_it`` for
    every ``i > t`` is panel ``t``'s part below its diagonal block). All matmuls on the default
    device; as :data:`Steps`, waiting for each block column.

    Memory: each block column is written into ``U`` (allocated once) and dropped, and panel
    ``j`` (read by block columns ``≤ j`` only) is released from ``panels`` once block column
    ``j`` is done, so besides ``U`` the panels left and one block column are held."""
    sizes = [d.shape[-1] for d in diag_inv]
    starts = [int(v) for v in np.cumsum([0, *sizes])]
    n = starts[-1]
    split = split and diag_inv[0].dtype == mx.float32
    u = mx.zeros((*diag_inv[0].shape[:-2], n, n), dtype=mx.float32)
    finite = mx.array(True)
    nb = len(sizes)
    dinv_parts = [_parts(d, split) for d in diag_inv]
    for j in range(nb):
        x_tj = diag_inv[j]  # X_jj
        pieces = [x_tj]
        acc = None  # Σ_{j≤t'≤t} L_it' X_t'j for the rows below block t
        for t in range(j, nb - 1):
            below = panels[t][..., sizes[t] :, :]  # type: ignore[index]
            term = _product(_parts(below, split), _parts(x_tj, split))
            acc = term if acc is None else acc[..., sizes[t] :, :] + term
            x_tj = -_product(dinv_parts[t + 1], _parts(acc[..., : sizes[t + 1], :], split))
            pieces.append(x_tj)
        col = mx.concatenate(pieces, axis=-2) if len(pieces) > 1 else pieces[0]
        s, m = starts[j], sizes[j]
        u[..., : n - s, n - s - m : n - s] = col[..., ::-1, ::-1].astype(mx.float32)
        finite = mx.logical_and(finite, mx.all(mx.isfinite(col)))
        panels[j] = None  # block columns after j do not read panel j
        del pieces, acc, x_tj, col
        yield [u, finite]
    if not bool(finite.item()):
        raise FactorizationError("inverse Hessian factor has NaN/Inf entries")
    return u


def factor_steps(h_damped: mx.array, block: int = 512, dtype: mx.Dtype = mx.float32,
                 split: bool | None = None) -> Steps[mx.array]:
    """:func:`blocked_factor_mlx` as :data:`Steps`."""
    if split is None:
        split = mx.default_device() != mx.cpu
    a = h_damped.astype(dtype)[..., ::-1, ::-1]
    panels, diag_inv = yield from cholesky_steps(a, block, split)
    del a
    return (yield from inverse_factor_steps(panels, diag_inv, split))


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
    ``split`` (default: on a GPU) makes every float32 matmul a :func:`split_matmul`.

    Besides ``h_damped`` and the returned ``U`` it holds about ``n²/2`` values (the panels of
    ``L``) plus one block column's temporaries. Matrices of different sizes are factorized in
    lockstep by :func:`run_together` over :func:`factor_steps`."""
    return run_together([factor_steps(h_damped, block, dtype, split)])[0]


def prepare_steps(h: mx.array, damping: float) -> Steps[tuple[mx.array, np.ndarray, np.ndarray]]:
    """:func:`prepare_hessians_mlx` as :data:`Steps` (one wait, for the figures the host
    reads)."""
    h = h.astype(mx.float32)
    finite = mx.all(mx.isfinite(h))
    n = h.shape[-1]
    diag = mx.diagonal(h, axis1=-2, axis2=-1)
    dead = diag <= 0
    n_dead_mx = mx.sum(dead, axis=-1)
    live_sum = mx.sum(mx.where(dead, 0.0, diag), axis=-1)
    live_mx = live_sum / mx.maximum(n - n_dead_mx, 1).astype(mx.float32)
    yield [finite, n_dead_mx, live_mx]
    if not bool(finite.item()):
        raise FactorizationError("Hessian has NaN/Inf entries (non-finite calibration activations)")
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


def prepare_hessians_mlx(h: mx.array, damping: float) -> tuple[mx.array, np.ndarray, np.ndarray]:
    """:func:`quantkit.kernels.linalg.prepare_hessians` on the default device (float32), for a
    stack ``h (E, n, n)``: in each matrix, dead inputs get a unit-scale diagonal and no coupling
    and ``damping · mean(live diag)`` is added to the diagonal. Returns ``(H, damp_value (E,),
    n_dead (E,))``, the last two NumPy arrays."""
    return run_together([prepare_steps(h, damping)])[0]


def prepare_hessian_mlx(h: mx.array, damping: float) -> tuple[mx.array, float, int]:
    """:func:`prepare_hessians_mlx` of one matrix ``(n, n)``: ``(H, damp_value, n_dead)``."""
    hs, damp, n_dead = prepare_hessians_mlx(h[None], damping)
    return hs[0], float(damp[0]), int(n_dead[0])
