"""The GPTQ and RTN kernels against float64 NumPy references, on synthetic and real layers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from reference import affine_params_ref, gptq_ref, hessian_error_ref

from quantkit import DampedCholesky, EscalatingCholesky, FactorizationError
from quantkit.kernels import (
    affine_dequantize,
    affine_params,
    affine_quantize,
    gptq_quantize,
    inverse_hessian_factor,
    prepare_hessian,
)


def correlated_inputs(n_tokens: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) / np.sqrt(width)
    scales = np.exp(rng.normal(size=width))  # uneven channel magnitudes, like real activations
    return (rng.normal(size=(n_tokens, width)) @ mixing) * scales


def rtn(w: mx.array, bits: int, gs: int) -> mx.array:
    s, b = affine_params(w, bits, gs)
    return affine_dequantize(affine_quantize(w, s, b, bits), s, b)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (4, 128), (8, 64)])
def test_gptq_matches_float64_reference(bits, group_size):
    rng = np.random.default_rng(bits * 1000 + group_size)
    x = correlated_inputs(4096, 256, seed=bits)
    h = x.T @ x / len(x)
    w = rng.normal(size=(48, 256)) * 0.05
    codes_ref, deq_ref = gptq_ref(w, h, bits, group_size)

    factor = DampedCholesky(0.01).factor(mx.array(h.astype(np.float32)))
    out = gptq_quantize(mx.array(w.astype(np.float32)), factor.u, bits=bits,
                        group_size=group_size, block_size=64)
    codes = np.array(out.codes).astype(np.int64)
    # Ties in rounding can flip a code between float32 and float64; after a flip the error
    # feedback differs slightly, so compare closely but not bit for bit.
    assert np.mean(codes != codes_ref) < 0.02
    err = hessian_error_ref(w, np.array(out.dequantized), h)
    err_ref = hessian_error_ref(w, deq_ref, h)
    assert err == pytest.approx(err_ref, rel=0.02)
    # the stored values are exactly scale * code + bias
    assert mx.allclose(affine_dequantize(out.codes, out.scales, out.biases), out.dequantized,
                       atol=1e-6)


def test_block_size_does_not_change_the_result():
    x = correlated_inputs(2048, 128, seed=7)
    h = mx.array((x.T @ x / len(x)).astype(np.float32))
    w = mx.array(np.random.default_rng(7).normal(size=(32, 128)).astype(np.float32))
    u = DampedCholesky().factor(h).u
    outs = [gptq_quantize(w, u, bits=3, group_size=32, block_size=b) for b in (32, 64, 128, 1000)]
    for o in outs[1:]:
        assert np.mean(np.array(o.codes) != np.array(outs[0].codes)) < 0.005


def test_gptq_beats_rtn_on_every_real_layer(stories_dir, stories_tokens):
    """Hessian-weighted error of GPTQ ≤ RTN's on each linear layer of stories260K, with Hessians
    of the real activations."""
    from quantkit import Recipe, quantize_model
    from quantkit.io import load_model

    model, _, _ = load_model(stories_dir)
    calib, _ = stories_tokens
    result = quantize_model(model, calib[:16], Recipe.uniform("gptq", 3, 32))
    checked = [r for r in result.report.layers if r.status == "quantized"]
    assert len(checked) == 31  # 5 blocks × 6 linears of input width 64 + the tied embedding
    for r in checked:
        assert r.hessian_error is not None and r.rtn_hessian_error is not None
        assert r.hessian_error <= r.rtn_hessian_error * 1.0001, r.path


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_affine_params_match_reference_and_mlx(bits):
    w = np.random.default_rng(bits).normal(size=(16, 256)).astype(np.float32)
    s, b = affine_params(mx.array(w), bits, 64)
    s_ref, b_ref = affine_params_ref(w.astype(np.float64), bits, 64)
    np.testing.assert_allclose(np.array(s), s_ref, rtol=1e-5)
    np.testing.assert_allclose(np.array(b), b_ref, rtol=1e-5, atol=1e-7)
    # MLX's reference implementation (CUDA's mx.quantize returns garbage at 1 bit: see
    # test_packing's docstring)
    _, s_mx, b_mx = mx.quantize(mx.array(w), group_size=64, bits=bits, stream=mx.cpu)
    assert mx.array_equal(s, s_mx) and mx.array_equal(b, b_mx)


def test_inverse_factor_matches_float64():
    x = correlated_inputs(1024, 96, seed=3)
    h = x.T @ x / len(x)
    hd, damp, n_dead = prepare_hessian(h, 0.01)
    assert n_dead == 0 and damp == pytest.approx(0.01 * np.mean(np.diag(h)))
    for backend in ("numpy", "mlx"):
        u = inverse_hessian_factor(hd, backend)
        np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=2e-3, atol=1e-6 * np.abs(np.linalg.inv(hd)).max())
        assert np.allclose(np.tril(u, -1), 0)


def test_dead_inputs_are_handled():
    x = correlated_inputs(512, 64, seed=4)
    x[:, [3, 17, 40]] = 0.0
    h = mx.array((x.T @ x / len(x)).astype(np.float32))
    factor = DampedCholesky(0.01).factor(h)
    assert factor.n_dead == 3
    assert np.all(np.isfinite(np.array(factor.u)))
    w = mx.random.normal((16, 64), key=mx.random.key(1))
    out = gptq_quantize(w, factor.u, bits=4, group_size=32)
    assert np.all(np.isfinite(np.array(out.dequantized)))


def test_escalating_damping_rescues_an_indefinite_hessian():
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    eig = np.linspace(1.0, 2.0, 32)
    eig[0] = -0.05  # slightly indefinite: 1% damping is not enough, 10% is
    h = mx.array((q @ np.diag(eig) @ q.T).astype(np.float32))
    with pytest.raises(FactorizationError):
        DampedCholesky(0.01).factor(h)
    factor = EscalatingCholesky(0.01).factor(h)
    assert factor.damping == pytest.approx(0.1)
    with pytest.raises(FactorizationError):
        EscalatingCholesky(0.01, max_attempts=1).factor(h)
