"""Cholesky factors written over their input, through the LAPACK NumPy itself calls.

``np.linalg.cholesky`` copies its input into a work buffer, factorizes it there and copies the
result out: three ``n²`` float64 arrays at once (216 MB for a 3072-wide Hessian). LAPACK's
``dpotrf`` works in place. :func:`cholesky_lower_inplace` calls the very ``dpotrf`` NumPy's
``linalg`` extension is linked against (looked up through that extension with ``ctypes``),
on the matrix laid out as NumPy lays it out for the call, so the factor is the one
``np.linalg.cholesky`` returns, bit for bit. That is checked once per process on a probe matrix;
where the entry point cannot be found or the probe differs (another LAPACK, another platform),
it falls back to ``np.linalg.cholesky`` (same values, NumPy's memory).

:func:`cholesky_of_lower` is the same ``dpotrf`` asked for the other triangle, which on a
row-major buffer is the lower one: no triangle copies, the factor to float64 rounding of
NumPy's rather than bit for bit (the GPU factorization's host steps, where the copies cost
more than the factorization). :func:`tri_inv_lower` inverts a factor with ``dtrtri``."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

#: ``dpotrf`` names, most specific first: NumPy's wheels (scipy-openblas, 64- or 32-bit
#: integers), Accelerate's new LAPACK (macOS), a plain LAPACK.
_NAMES = ("scipy_dpotrf_64_", "scipy_dpotrf_", "dpotrf$NEWLAPACK$ILP64", "dpotrf$NEWLAPACK",
          "dpotrf_64_", "dpotrf_")
#: Tile edge of the in-place triangle copies (each tile's temporary: 512 KB).
_TILE = 256


def _mirror(a: np.ndarray, lower_to_upper: bool) -> None:
    """Copy the strict lower triangle of the square matrix ``a`` onto the upper one (or the
    other way round), in place, a tile at a time."""
    n = a.shape[-1]
    for i in range(0, n, _TILE):
        for j in range(i, n, _TILE):
            if i == j:
                block = a[i:i + _TILE, i:i + _TILE]
                k = block.shape[0]
                idx = np.triu_indices(k, 1) if lower_to_upper else np.tril_indices(k, -1)
                block[idx] = block.T[idx]
            elif lower_to_upper:
                a[i:i + _TILE, j:j + _TILE] = a[j:j + _TILE, i:i + _TILE].T
            else:
                a[j:j + _TILE, i:i + _TILE] = a[i:i + _TILE, j:j + _TILE].T


def _zero_upper(a: np.ndarray) -> None:
    """Zero the strict upper triangle of the square matrix ``a`` in place."""
    n = a.shape[-1]
    for i in range(0, n, _TILE):
        block = a[i:i + _TILE, i:]
        block[np.triu_indices(block.shape[0], 1, block.shape[1])] = 0.0


def _potrf(fn: Callable[..., None], a: np.ndarray) -> int:
    """LAPACK ``dpotrf("L")`` on the C-contiguous float64 ``a`` read as a column-major matrix.
    Integers are passed as zero-padded 64-bit values: read whole by an ILP64 LAPACK, by their
    low half (little-endian) by an LP64 one."""
    n = a.shape[-1]
    uplo, size, lda, info = ctypes.c_char(b"L"), ctypes.c_int64(n), ctypes.c_int64(n), ctypes.c_int64(0)
    fn(ctypes.byref(uplo), ctypes.byref(size), a.ctypes.data_as(ctypes.c_void_p),
       ctypes.byref(lda), ctypes.byref(info), ctypes.c_size_t(1))
    return int(info.value)


def _factor_one(fn: Callable[..., None], a: np.ndarray) -> None:
    """``a`` (C-contiguous ``(n, n)`` float64) overwritten by its lower Cholesky factor, the way
    NumPy computes it: NumPy hands LAPACK the matrix in column-major order and asks for ``L``,
    which reads the lower triangle. Mirroring that triangle onto the upper one makes the
    row-major buffer read column-major hold the same lower triangle; the factor comes back in
    the buffer's upper triangle (``Lᵀ`` row-major) and is mirrored back."""
    _mirror(a, lower_to_upper=True)
    info = _potrf(fn, a)
    if info != 0:
        raise np.linalg.LinAlgError("Matrix is not positive definite")
    _mirror(a, lower_to_upper=False)
    _zero_upper(a)


def _lookup(names: tuple[str, ...]) -> Callable[..., None] | None:
    """The first of ``names`` found through NumPy's ``linalg`` extension (its own symbols and
    those of the LAPACK it is linked against)."""
    try:
        from numpy.linalg import _umath_linalg

        lib = ctypes.CDLL(_umath_linalg.__file__)
    except (ImportError, OSError, AttributeError):
        return None
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = None
            return fn
    return None


def _probe(n: int = 384) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, n))
    return x.T @ x / 512 + 0.01 * np.eye(n)


@functools.cache
def _entry_point() -> Callable[..., None] | None:
    """NumPy's own ``dpotrf``, if found and it reproduces ``np.linalg.cholesky`` on a probe."""
    fn = _lookup(_NAMES)
    if fn is None:
        return None
    probe = _probe()
    mine = probe.copy()
    try:
        _factor_one(fn, mine)
    except np.linalg.LinAlgError:
        return None
    return fn if np.array_equal(mine, np.linalg.cholesky(probe)) else None


#: ``dtrtri`` names, in the order of :data:`_NAMES`.
_TRTRI_NAMES = tuple(name.replace("dpotrf", "dtrtri") for name in _NAMES)


def _trtri_upper(fn: Callable[..., None], a: np.ndarray) -> int:
    """LAPACK ``dtrtri("U", "N")`` on the C-contiguous float64 ``a`` read as a column-major
    matrix (integers passed as in :func:`_potrf`)."""
    n = a.shape[-1]
    uplo, diag = ctypes.c_char(b"U"), ctypes.c_char(b"N")
    size, lda, info = ctypes.c_int64(n), ctypes.c_int64(n), ctypes.c_int64(0)
    fn(ctypes.byref(uplo), ctypes.byref(diag), ctypes.byref(size),
       a.ctypes.data_as(ctypes.c_void_p), ctypes.byref(lda), ctypes.byref(info),
       ctypes.c_size_t(1), ctypes.c_size_t(1))
    return int(info.value)


@functools.cache
def _trtri_entry_point() -> Callable[..., None] | None:
    """The ``dtrtri`` of NumPy's LAPACK, if found and it inverts a probe factor to within
    float64 rounding of ``np.linalg.inv``."""
    fn = _lookup(_TRTRI_NAMES)
    if fn is None:
        return None
    lower = np.linalg.cholesky(_probe())
    mine = lower.copy()
    if _trtri_upper(fn, mine) != 0:
        return None
    ref = np.linalg.inv(lower)
    return fn if np.allclose(mine, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max()) else None


def tri_inv_lower(lower: np.ndarray) -> np.ndarray | None:
    """The inverse of each lower-triangular float64 matrix of ``lower`` (``(n, n)`` or a stack)
    by LAPACK's ``dtrtri`` (about ``n³/3`` flops, a third of an LU inverse's), as a new
    C-contiguous array; ``None`` where that routine is not available (the caller then inverts
    another way). A row-major lower triangle is, read column-major, an upper one: ``dtrtri("U")``
    inverts it in place and leaves the (zero) other triangle alone."""
    fn = _trtri_entry_point()
    if fn is None:
        return None
    out = np.array(lower, dtype=np.float64, order="C", copy=True)
    for m in out.reshape(-1, *out.shape[-2:]):
        if _trtri_upper(fn, m) != 0:  # a zero on the diagonal: not a Cholesky factor
            raise np.linalg.LinAlgError("Singular matrix")
    return out


def _potrf_upper(fn: Callable[..., None], a: np.ndarray) -> int:
    """LAPACK ``dpotrf("U")`` on the C-contiguous float64 ``a`` read as a column-major matrix:
    it reads the row-major *lower* triangle (the column-major upper one) and writes ``L``
    there (``A = UᵀU`` column-major is ``A = L Lᵀ`` row-major), leaving the other triangle."""
    n = a.shape[-1]
    uplo, size, lda, info = ctypes.c_char(b"U"), ctypes.c_int64(n), ctypes.c_int64(n), ctypes.c_int64(0)
    fn(ctypes.byref(uplo), ctypes.byref(size), a.ctypes.data_as(ctypes.c_void_p),
       ctypes.byref(lda), ctypes.byref(info), ctypes.c_size_t(1))
    return int(info.value)


@functools.cache
def _lower_entry_point() -> Callable[..., None] | None:
    """NumPy's ``dpotrf``, if found and :func:`_potrf_upper` on a probe gives NumPy's factor to
    within float64 rounding."""
    fn = _entry_point()
    if fn is None:
        return None
    probe = _probe()
    mine = probe.copy()
    if _potrf_upper(fn, mine) != 0:
        return None
    ref = np.linalg.cholesky(probe)
    mine = np.tril(mine)
    return fn if np.allclose(mine, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max()) else None


def cholesky_of_lower(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous float64, ``(n, n)`` or a stack) overwritten by the lower Cholesky
    factor of the symmetric matrix whose lower triangle ``a`` holds (its upper triangle is not
    read, and is zeroed), and returned: one LAPACK call per matrix, no triangle copies, the
    factor to float64 rounding of NumPy's (not bit for bit: :func:`cholesky_lower_inplace`
    is). Raises ``np.linalg.LinAlgError`` when a matrix is not positive definite."""
    if a.dtype != np.float64 or not a.flags.c_contiguous:
        raise ValueError("cholesky_of_lower needs a C-contiguous float64 array")
    fn = _lower_entry_point()
    n = a.shape[-1]
    if fn is None:
        low = np.tril(a)
        a[...] = np.linalg.cholesky(low + np.swapaxes(np.tril(a, -1), -1, -2))
        return a
    for m in a.reshape(-1, n, n):
        if _potrf_upper(fn, m) != 0:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
    a *= np.tri(n, dtype=bool)
    return a


def cholesky_lower_inplace(a: np.ndarray) -> np.ndarray:
    """``a`` (float64, ``(n, n)`` or a stack ``(..., n, n)``, C-contiguous) overwritten by the
    lower Cholesky factor of each matrix — bit for bit what ``np.linalg.cholesky(a)`` returns —
    and returned. Raises ``np.linalg.LinAlgError`` as NumPy does when a matrix is not positive
    definite (``a`` is then left partly overwritten)."""
    if a.dtype != np.float64 or not a.flags.c_contiguous:
        raise ValueError("cholesky_lower_inplace needs a C-contiguous float64 array")
    fn = _entry_point()
    if fn is None:
        a[...] = np.linalg.cholesky(a)
        return a
    for m in a.reshape(-1, *a.shape[-2:]):
        _factor_one(fn, m)
    return a
