"""The in-place inverse-Hessian factor (NumPy backend) gives the copying path's values bit for
bit, and keeps one n² float64 matrix instead of several."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from quantkit.errors import FactorizationError
from quantkit.kernels import lapack
from quantkit.kernels.blocked_cholesky import reversed_factor_numpy
from quantkit.kernels.linalg import inverse_hessian_factor, prepare_hessians


def _hessians(e: int, n: int, seed: int = 0) -> np.ndarray:
    """``e`` Hessians ``XᵀX / m`` of float32 activations (one input channel much louder, one
    dead), as the calibration builds them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(e):
        x = rng.standard_normal((2 * n, n)).astype(np.float32)
        x[:, 3] *= 50
        x[:, 7] = 0
        out.append((x.T @ x) / np.float32(2 * n))
    return np.stack(out)


@pytest.mark.parametrize("n", [200, 601, 1024])  # below the 256 leaf, odd, even
def test_inplace_factor_is_bitwise_the_copying_one(n):
    hd, _, _ = prepare_hessians(_hessians(2, n), 0.01)
    expected = reversed_factor_numpy(hd)
    work = hd.copy()
    got = inverse_hessian_factor(work, "numpy", overwrite=True)
    assert got is work  # computed in the caller's memory
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(inverse_hessian_factor(hd[0].copy(), "numpy", overwrite=True),
                                  expected[0])


def test_inplace_cholesky_matches_numpy_and_its_entry_point_is_found():
    hd, _, _ = prepare_hessians(_hessians(1, 700, seed=1), 0.01)
    work = hd[0].copy()
    np.testing.assert_array_equal(lapack.cholesky_lower_inplace(work), np.linalg.cholesky(hd[0]))
    # NumPy's wheels (OpenBLAS on Linux/Windows, Accelerate on macOS) export dpotrf: the
    # fallback (NumPy's copy) would pass the equality above but keep the memory.
    assert lapack._entry_point() is not None


def test_inplace_factor_raises_on_indefinite_matrix():
    h = _hessians(1, 300)[0].astype(np.float64)
    h[5, 5] = -1.0  # not positive definite
    with pytest.raises(FactorizationError, match="Cholesky factorization failed"):
        inverse_hessian_factor(h, "numpy", overwrite=True)


def test_inplace_factor_holds_no_second_matrix():
    n = 1024
    hd, _, _ = prepare_hessians(_hessians(1, n)[0][None], 0.01)
    work = hd[0].copy()
    tracemalloc.start()
    try:
        inverse_hessian_factor(work, "numpy", overwrite=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The copying path allocates ~4 n² float64; in place: the triangular inverse's (n/2)²
    # product and NumPy's buffer for writing it into a strided view (measured 0.47 n²).
    assert peak < 0.6 * work.nbytes, peak / work.nbytes


@pytest.mark.parametrize("shape", [(300, 300), (3, 512, 512)])  # one block, an expert stack
def test_lapack_triangular_inverse_matches_numpy_s_inverse(shape):
    """The GPU path's diagonal blocks are factorized and inverted on the host by LAPACK's
    dpotrf (on the lower triangle, no triangle copies) and dtrtri (a third of an LU inverse's
    flops): NumPy's Cholesky factors and their inverses, to float64 rounding."""
    import mlx.core as mx

    from quantkit.kernels.blocked_cholesky import _host_block_factor

    hd, _, _ = prepare_hessians(_hessians(int(np.prod(shape[:-2])), shape[-1], seed=2), 0.01)
    hd = hd.reshape(shape).astype(np.float32)
    lower, inverse = _host_block_factor(mx.array(hd))
    expected = np.linalg.cholesky(hd.astype(np.float64))
    assert np.abs(lower - expected).max() <= 1e-13 * np.abs(expected).max()
    assert np.all(np.triu(lower, 1) == 0)
    ref = np.linalg.inv(expected)
    assert np.abs(inverse - ref).max() <= 1e-12 * np.abs(ref).max()
    assert np.all(np.triu(inverse, 1) == 0)
    # NumPy's wheels export dtrtri beside dpotrf: the recursive fallback is not what ran.
    assert lapack._trtri_entry_point() is not None


@pytest.mark.parametrize("entry_point", ["lapack", "fallback"])
def test_cholesky_of_lower_reads_only_the_lower_triangle(entry_point, monkeypatch):
    """The blocked factorization keeps only the lower triangle of its trailing matrix up to
    date: the host factor must not read the other one (garbage there changes nothing)."""
    if entry_point == "fallback":
        monkeypatch.setattr(lapack, "_lower_entry_point", lambda: None)
    hd, _, _ = prepare_hessians(_hessians(2, 384, seed=5), 0.01)
    work = hd.copy()
    iu = np.triu_indices(384, 1)
    work[:, iu[0], iu[1]] = 1e6  # not symmetric, not positive definite as a full matrix
    lower = lapack.cholesky_of_lower(work)
    assert lower is work
    expected = np.linalg.cholesky(hd)
    assert np.abs(lower - expected).max() <= 1e-13 * np.abs(expected).max()
    assert np.all(np.triu(lower, 1) == 0)
    bad = hd[0].copy()
    bad[7, 7] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        lapack.cholesky_of_lower(bad)


def test_host_block_factor_refuses_an_indefinite_block():
    import mlx.core as mx

    from quantkit.kernels.blocked_cholesky import _host_block_factor

    h = _hessians(1, 256)[0]
    h[9, 9] = -1.0
    with pytest.raises(FactorizationError, match="Cholesky factorization failed"):
        _host_block_factor(mx.array(h))
