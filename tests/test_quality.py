"""Quality strategies: scale search, act-order with static groups, every affine width, float
formats, and Hessian accumulation, each against a float64 NumPy reference."""

from __future__ import annotations

from typing import ClassVar

import attrs
import mlx.core as mx
import numpy as np
import pytest

from quantkit.errors import RecipeError
from quantkit.hessian import DenseHessianCollector, HessianStats
from quantkit.kernels.floatfmt import (
    FLOAT_FORMATS,
    decode_scales,
    float_quantize,
    float_scales,
    gptq_quantize_float,
    round_to_grid,
)
from quantkit.kernels.gptq import gptq_quantize
from quantkit.kernels.packing import unpack_bits
from quantkit.kernels.rtn import affine_params
from quantkit.kernels.search import search_affine_params, shrink_grid
from quantkit.packers import packer_for
from quantkit.quantizers import GPTQQuantizer, Quantizer, RTNQuantizer, round_to_nearest
from quantkit.recipe import Recipe
from quantkit.specs import QuantSpec

# -- float64 NumPy references ------------------------------------------------------------------


def np_affine_params(lo, hi, bits):
    """MLX's scale/bias rule (see kernels/rtn.py) in float64."""
    n = (1 << bits) - 1
    scale = np.maximum((hi - lo) / n, 1e-7)
    lower = np.abs(lo) > np.abs(hi)
    scale = np.where(lower, scale, -scale)
    edge = np.where(lower, lo, hi)
    q0 = np.round(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale)
    return scale, np.where(q0 == 0, 0.0, edge)


def np_group_error(w, s, b, bits, gs, imp):
    g = w.reshape(w.shape[0], -1, gs)
    q = np.clip(np.round((g - b[..., None]) / s[..., None]), 0, (1 << bits) - 1)
    d = q * s[..., None] + b[..., None] - g
    return np.sum(d * d * imp.reshape(-1, gs), axis=-1)


def np_search_error(w, bits, gs, imp):
    """Least weighted error per group over the same shrink grid, in float64."""
    g = w.reshape(w.shape[0], -1, gs)
    errs = []
    for a in shrink_grid():
        s, b = np_affine_params(a * g.min(-1), a * g.max(-1), bits)
        errs.append(np_group_error(w, s, b, bits, gs, imp))
    return np.min(errs, axis=0)


def np_upper_inverse_factor(h, damping=0.01):
    h = h + damping * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def np_gptq(w, u, quantize_col, order):
    """Textbook GPTQ (Frantar et al. 2022), one column at a time, in float64: ``u`` is the upper
    factor of the permuted inverse Hessian; ``quantize_col(col, original_index)``."""
    w = w[:, order].copy()
    out = np.zeros_like(w)
    for i in range(w.shape[1]):
        out[:, i] = quantize_col(w[:, i], order[i])
        err = (w[:, i] - out[:, i]) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    res = np.empty_like(out)
    res[:, order] = out
    return res


def hessian_error(w, w_hat, h):
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("ij,ij->", d @ np.asarray(h, np.float64), d))


def random_problem(n_out=16, n_in=128, n_tok=512, seed=0):
    """Weights and a correlated, unevenly scaled Hessian like a real layer's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_tok, n_in)) @ (np.eye(n_in) + 0.3 * rng.standard_normal((n_in, n_in)))
    x *= np.exp(rng.standard_normal(n_in))  # some inputs much larger than others
    w = rng.standard_normal((n_out, n_in)) * 0.05
    w[rng.random(w.shape) < 0.01] *= 8  # outliers
    return w.astype(np.float32), (x.T @ x / n_tok).astype(np.float32)


# -- scale search -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_matches_float64_reference(bits, weighted):
    w, h = random_problem(n_out=32, n_in=128)
    imp = np.diag(h).astype(np.float64) if weighted else np.ones(128)
    s, b = search_affine_params(mx.array(w), bits, 32, mx.array(imp.astype(np.float32)) if weighted else None)
    got = np_group_error(w.astype(np.float64), np.array(s, np.float64), np.array(b, np.float64), bits, 32, imp)
    best = np_search_error(w.astype(np.float64), bits, 32, imp)
    rs, rb = np_affine_params(w.reshape(32, -1, 32).min(-1), w.reshape(32, -1, 32).max(-1), bits)
    plain = np_group_error(w.astype(np.float64), rs, rb, bits, 32, imp)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-9)
    assert np.all(got <= plain * (1 + 1e-5) + 1e-12)
    assert got.sum() < plain.sum()


# -- GPTQ kernel: act-order with static groups ----------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_static_groups_matches_float64_reference(bits):
    w, h = random_problem()
    gs = 32
    order = np.argsort(-np.diag(h), kind="stable")
    s, b = affine_params(mx.array(w), bits, gs)
    u = np_upper_inverse_factor(h.astype(np.float64)[order][:, order])
    out = gptq_quantize(mx.array(w[:, order]), mx.array(u.astype(np.float32)), bits=bits,
                        group_size=gs, scales=s, biases=b, group_index=(order // gs).tolist())
    s64, b64 = np.array(s, np.float64), np.array(b, np.float64)

    def quantize_col(col, j):
        g = j // gs
        q = np.clip(np.round((col - b64[:, g]) / s64[:, g]), 0, (1 << bits) - 1)
        return q * s64[:, g] + b64[:, g]

    ref = np_gptq(w.astype(np.float64), u, quantize_col, order)
    got = np.array(out.dequantized)[:, np.argsort(order)]
    # float32 vs float64 may flip a rare rounding decision; everything else must agree
    assert np.mean(np.abs(got - ref) > 1e-4) < 0.01
    assert hessian_error(w, got, h) == pytest.approx(hessian_error(w, ref, h), rel=0.02)
    np.testing.assert_array_equal(np.array(out.scales), np.array(s))  # static: stored as given


def _stats(h):
    return HessianStats(h=mx.array(h), n_tokens=512)


def test_act_order_and_search_beat_plain_gptq_and_rtn_on_random_layer():
    w, h = random_problem(n_out=16, n_in=128)
    spec = QuantSpec(bits=3, group_size=32)
    err = {}
    for name, q in {
        "rtn": RTNQuantizer(), "rtn_h": RTNQuantizer(scale_search="hessian"),
        "gptq": GPTQQuantizer(), "ao": GPTQQuantizer(act_order=True),
        "best": GPTQQuantizer(act_order=True, scale_search="hessian"),
    }.items():
        err[name] = hessian_error(w, q.quantize(mx.array(w), spec, _stats(h)).dequantized, h)
    assert err["rtn_h"] < err["rtn"]
    assert err["gptq"] < err["rtn"]
    assert err["ao"] < err["gptq"]
    assert err["best"] < err["gptq"]


# -- every affine width and group size, exact repack ---------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_every_affine_width_repacks_exactly(bits, group_size):
    w, h = random_problem(n_out=4, n_in=128, seed=bits)
    spec = QuantSpec(bits=bits, group_size=group_size)
    rtn = round_to_nearest(mx.array(w), spec, mx.float16).dequantized
    for q in (GPTQQuantizer(), GPTQQuantizer(act_order=True, scale_search="hessian")):
        res = q.quantize(mx.array(w), spec, _stats(h), storage_dtype=mx.float16)
        packed = packer_for("affine").pack(res, mx.float16)
        assert packed["weight"].shape == (4, 128 * bits // 32)
        np.testing.assert_array_equal(np.array(unpack_bits(packed["weight"], bits)), np.array(res.codes))
        # (float32 scales: MLX dequantizes float16 scales in float16 arithmetic)
        deq = mx.dequantize(packed["weight"], packed["scales"].astype(mx.float32),
                            packed["biases"].astype(mx.float32), group_size=group_size, bits=bits)
        np.testing.assert_allclose(np.array(deq), np.array(res.dequantized), rtol=1e-5, atol=1e-6)
    # act-order + search beats round to nearest at every width (plain GPTQ can lose at 2 bits
    # on this deliberately ill-conditioned problem)
    assert hessian_error(w, deq, h) <= hessian_error(w, rtn, h)


# -- float formats --------------------------------------------------------------------------------


def np_round_to_grid(x, mode):
    if FLOAT_FORMATS[mode][0] == "e2m1":
        grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    else:  # every non-negative finite E4M3 value
        e, m = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
        grid = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)).ravel()
        grid = np.unique(grid[grid <= 448])
    a = np.abs(x)
    return np.sign(x) * grid[np.argmin(np.abs(a[..., None] - grid), axis=-1)]


@pytest.mark.parametrize("mode", sorted(FLOAT_FORMATS))
def test_round_to_grid_matches_float64_nearest(mode):
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 3
    _, v = round_to_grid(mx.array(x), mode)
    np.testing.assert_array_equal(np.array(v), np_round_to_grid(x.astype(np.float64), mode))


@pytest.mark.parametrize("mode", sorted(FLOAT_FORMATS))
def test_float_rtn_equals_mlx(mode):
    w = mx.array(np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32))
    bits, gs = FLOAT_FORMATS[mode][2], (16 if mode == "nvfp4" else 32)
    wq, scales = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
    ref = mx.dequantize(wq, scales, group_size=gs, bits=bits, mode=mode, dtype=mx.float32)
    codes, deq = float_quantize(w, scales, mode)
    np.testing.assert_array_equal(np.array(deq), np.array(ref))
    # and GPTQ with an identity Hessian is round to nearest
    out = gptq_quantize_float(w, mx.eye(128), scales, mode=mode)
    np.testing.assert_array_equal(np.array(out.dequantized), np.array(ref))


@pytest.mark.parametrize("mode", sorted(FLOAT_FORMATS))
@pytest.mark.parametrize("act_order", [False, True])
def test_float_gptq_packs_exactly_and_beats_rtn(mode, act_order):
    bits, gs = FLOAT_FORMATS[mode][2], (16 if mode == "nvfp4" else 32)
    w, h = random_problem(n_out=16, n_in=128, seed=3)
    spec = QuantSpec(bits=bits, group_size=gs, mode=mode)
    res = GPTQQuantizer(act_order=act_order).quantize(mx.array(w), spec, _stats(h))
    packed = packer_for(mode).pack(res, mx.float16)
    deq = mx.dequantize(packed["weight"], packed["scales"], group_size=gs, bits=bits, mode=mode,
                        dtype=mx.float32)
    np.testing.assert_array_equal(np.array(deq), np.array(res.dequantized))
    np.testing.assert_array_equal(np.array(packed["scales"]), np.array(float_scales(mx.array(w), mode, gs)))
    rtn = round_to_nearest(mx.array(w), spec, mx.float16).dequantized
    assert hessian_error(w, deq, h) < hessian_error(w, rtn, h)


def test_float_gptq_matches_float64_reference():
    mode, gs = "mxfp4", 32
    w, h = random_problem(n_out=8, n_in=64, seed=4)
    scales = float_scales(mx.array(w), mode, gs)
    s64 = np.array(decode_scales(scales, mode), np.float64)
    u = np_upper_inverse_factor(h.astype(np.float64))
    out = gptq_quantize_float(mx.array(w), mx.array(u.astype(np.float32)), scales, mode=mode)
    ref = np_gptq(w.astype(np.float64), u,
                  lambda col, j: np_round_to_grid(col / s64[:, j // gs], mode) * s64[:, j // gs],
                  np.arange(64))
    assert np.mean(np.array(out.dequantized) != ref) < 0.01


# -- Hessian accumulation -------------------------------------------------------------------------


def test_hessian_running_mean_is_stable_over_long_calibration():
    """600 batches (~150k tokens) with a large common offset and uneven scales: the float32
    running mean stays within 1e-5 of the float64 mean and does not drift."""
    rng = np.random.default_rng(5)
    n = 32
    col = DenseHessianCollector(n)
    total = np.zeros((n, n))
    count = 0
    for i in range(600):
        x = (20.0 + rng.standard_normal((256, n)) * np.exp(rng.standard_normal(n))).astype(np.float32)
        col.update(mx.array(x))
        if i % 50 == 0:
            mx.eval(col.arrays())
        total += x.astype(np.float64).T @ x
        count += len(x)
        if i in (59, 599):
            ref = total / count
            rel = np.abs(np.array(col.stats().h, np.float64) - ref).max() / np.abs(ref).max()
            assert rel < 1e-5
    assert col.stats().n_tokens == count


def test_hessian_half_precision_inputs_do_not_overflow():
    """float16 activations whose squares overflow float16 (|x| = 300) accumulate in float32."""
    x = np.full((64, 8), 300.0, dtype=np.float16)
    col = DenseHessianCollector(8)
    for _ in range(10):
        col.update(mx.array(x))
    np.testing.assert_allclose(np.array(col.stats().h), np.full((8, 8), 90000.0), rtol=1e-6)


# -- recipes ------------------------------------------------------------------------------------


def test_recipe_options_select_strategies_per_layer():
    r = Recipe.from_dict({
        "default": {"strategy": "gptq", "bits": 3, "act_order": True, "scale_search": "hessian"},
        "rules": [{"match": "*.down_proj", "strategy": "rtn", "scale_search": "mse"}],
    })
    q = r.resolve("model.layers.0.q_proj")[1].make_quantizer()
    assert q == GPTQQuantizer(act_order=True, scale_search="hessian")
    rtn = r.resolve("model.layers.0.mlp.down_proj")[1].make_quantizer()
    assert rtn == RTNQuantizer(scale_search="mse") and not rtn.needs_hessian
    assert RTNQuantizer(scale_search="hessian").needs_hessian
    with pytest.raises(RecipeError, match="scale_search"):
        Recipe.from_dict({"default": {"scale_search": "bogus"}})


# -- real layers of stories260K ------------------------------------------------------------------


_SINK: list = []


@attrs.frozen
class _Recorder(Quantizer):
    """Test-only strategy: keeps each layer's weight and Hessian, stores RTN."""

    name: ClassVar[str] = "_test_record"

    def quantize(self, weight, spec, stats, storage_dtype=mx.float32):
        _SINK.append((np.array(weight), np.array(stats.h)))
        return round_to_nearest(weight, spec, storage_dtype)


@pytest.fixture(scope="module")
def real_layers(stories_dir, stories_tokens):
    """(weight, Hessian) of six layers of the real stories260K (MLP padded to 192 so every
    layer takes group 32), calibrated block by block on TinyStories."""
    from quantkit.io import load_model
    from quantkit.quantizers import STRATEGIES, register_strategy
    from quantkit.walker import ModelWalker

    pad = stories_dir.parent / "stories260K-pad192"
    if not pad.exists():
        pytest.skip(f"{pad} is absent: these tests need the ../shared models")
    register_strategy(_Recorder)
    try:
        model, _, _ = load_model(pad)
        _SINK.clear()
        recipe = Recipe.from_dict({"default": {"strategy": "_test_record", "group_size": 32}})
        ModelWalker(recipe=recipe).run(model, stories_tokens[0][:16])
    finally:
        STRATEGIES.pop(_Recorder.name, None)
    return [_SINK[i] for i in (0, 5, 13, 20, 27, 34)]  # spread over blocks and layer kinds


@pytest.mark.parametrize("bits", [3, 4])
def test_quality_strategies_on_real_layers(real_layers, bits):
    spec = QuantSpec(bits=bits, group_size=32)
    total = {k: 0.0 for k in ("rtn", "rtn_h", "gptq", "ao", "best")}
    for w, h in real_layers:
        stats = _stats(h)
        for name, q in {
            "rtn": RTNQuantizer(), "rtn_h": RTNQuantizer(scale_search="hessian"),
            "gptq": GPTQQuantizer(), "ao": GPTQQuantizer(act_order=True),
            "best": GPTQQuantizer(act_order=True, scale_search="hessian"),
        }.items():
            total[name] += hessian_error(w, q.quantize(mx.array(w), spec, stats).dequantized, h)
    assert total["rtn_h"] < total["rtn"]
    assert total["gptq"] < total["rtn"]
    assert total["ao"] <= total["gptq"]
    assert total["best"] <= total["gptq"]
