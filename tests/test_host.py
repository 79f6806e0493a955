"""The NumPy calibration backend (quantkit.host) against MLX's own layers and collectors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from quantkit import host
from quantkit.hessian import DenseHessianCollector
from quantkit.host import HostHessianCollector, HostLinear, host_collector, runs_on_host
from quantkit.recipe import Recipe
from quantkit.walker import ModelWalker

ON_CPU = mx.default_device() == mx.cpu
#: MLX's CUDA backend multiplies float32 matrices in TF32 (operands rounded to 10 mantissa bits,
#: relative error ~3e-4 measured on an H200) while NumPy is exact float32 BLAS: comparisons of
#: the host path with an MLX float32 matmul get this tolerance on such a GPU (measured there:
#: at most 7.4e-4 on these layers' outputs).
MM_TOL = 3e-3
#: HostLinear (NumPy) against MLX's float32 matmul: float32 rounding on a CPU, TF32 on a GPU.
MLX_MATMUL = dict(rtol=1e-5, atol=1e-5) if ON_CPU else dict(rtol=MM_TOL, atol=MM_TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_host_linear_matches_mlx_linear(bias):
    mx.random.seed(0)
    layer = nn.Linear(96, 40, bias=bias)
    x = mx.random.normal((3, 7, 96))
    ref = layer(x)
    out = HostLinear(layer)(x)
    assert out.shape == ref.shape == (3, 7, 40) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), np.array(ref), **MLX_MATMUL)
    # The wrapper reads the layer's attributes and does not register parameters of its own.
    assert HostLinear(layer).weight is layer.weight
    names = {k for k, _ in tree_flatten(HostLinear(layer).parameters())}
    assert names == {f"module.{k}" for k in (["weight", "bias"] if bias else ["weight"])}


def test_host_linear_reads_the_mlx_weight_without_copying():
    layer = nn.Linear(32, 8, bias=False)
    mx.eval(layer.parameters())
    runner = HostLinear(layer)
    assert np.shares_memory(runner._weight_t, np.asarray(layer.weight))
    x = mx.random.normal((5, 32))
    np.testing.assert_allclose(np.array(runner(x)), np.array(x @ layer.weight.T), **MLX_MATMUL)


def test_host_collector_matches_dense_collector():
    """Running means over uneven batches (and an empty one) agree with MLX's collector."""
    rng = np.random.default_rng(0)
    ref, fast = DenseHessianCollector(64), HostHessianCollector(64)
    for rows in (5, 300, 0, 17, 1024):
        x = mx.array(rng.standard_normal((rows, 64)).astype(np.float32) * rng.uniform(0.1, 3, 64))
        ref.update(x)
        fast.update(x.reshape(1, rows, 64))
    a, b = ref.stats(), fast.stats()
    assert a.n_tokens == b.n_tokens == 1346
    if ON_CPU:
        np.testing.assert_allclose(np.array(b.h), np.array(a.h), rtol=1e-4, atol=1e-5)
    else:  # MLX's xᵀx is TF32: each term off by ~2⁻¹⁰ relative, so (Cauchy–Schwarz) an
        # entry by at most ~1e-3·sqrt(h_ii·h_jj)
        d = np.sqrt(np.diag(np.array(a.h)))
        assert np.all(np.abs(np.array(b.h) - np.array(a.h)) <= MM_TOL * np.outer(d, d))


def test_only_plain_float32_linears_and_dense_collectors_go_to_numpy():
    assert runs_on_host(nn.Linear(8, 8))
    half = nn.Linear(8, 8)
    half.set_dtype(mx.bfloat16)
    assert not runs_on_host(half)  # NumPy has no bfloat16
    assert not runs_on_host(nn.QuantizedLinear(64, 8))
    assert isinstance(host_collector(DenseHessianCollector(8)), HostHessianCollector)
    other = object.__new__(type("Other", (DenseHessianCollector,), {}))
    assert host_collector(other) is other  # a subclass gathers something else: kept
    with pytest.raises(ValueError, match="backend must be one of"):
        host.resolve_backend("torch")
    assert host.resolve_backend("mlx") == "mlx"
    assert host.resolve_backend("auto") == ("numpy" if ON_CPU else "mlx")


def _tiny_llama():
    from mlx_lm.models import llama

    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
        tie_word_embeddings=False,
    ))
    mx.eval(model.parameters())
    return model


def test_walk_with_numpy_backend_matches_mlx_backend(monkeypatch):
    """The same walk with the block's linear layers and Hessians in NumPy and in MLX: every
    layer calibrated through NumPy, the same layers quantized, errors equal to float32 noise
    (on a CUDA GPU, MLX's Hessians are TF32 products: GPTQ moves a few codes, errors agree to 2%,
    as in test_speed_paths' walks)."""
    calls = {"forward": 0}
    real = host.linear_forward

    def counting(*a):
        calls["forward"] += 1
        return real(*a)

    monkeypatch.setattr(host, "linear_forward", counting)
    real_attention = host.attention_numpy

    def counting_attention(*a, **kw):
        calls["attention"] += 1
        return real_attention(*a, **kw)

    monkeypatch.setattr(host, "attention_numpy", counting_attention)
    tokens = mx.random.randint(0, 256, (8, 48), key=mx.random.key(1))
    recipe = Recipe.uniform("gptq", bits=4, group_size=32)
    runs = {}
    for backend in ("mlx", "numpy"):
        calls["forward"] = calls["attention"] = 0
        model = _tiny_llama()
        runs[backend] = ModelWalker(recipe=recipe, batch_size=4, backend=backend).run(model, tokens)
        runs[backend + "_calls"] = dict(calls)
    assert runs["mlx_calls"] == {"forward": 0, "attention": 0}
    # 7 linear layers and one attention per block, 2 blocks, 2 batches: collection and
    # stand-in forward passes; the second collection pass of a block ends at the down
    # projection's input (pipeline.calibrate.TailCut), so that layer runs once less per block.
    assert runs["numpy_calls"] == {"forward": 2 * (7 * 2 * 2 - 1), "attention": 2 * 2 * 2}
    from mlx_lm.models import base, llama
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention  # put back
    ref = {r.path: r for r in runs["mlx"].report.layers}
    fast = runs["numpy"].report.layers
    assert [r.path for r in fast] == list(ref) and len(fast) == 16  # 14 + head + embedding
    for r in fast:
        assert r.status == ref[r.path].status
        if r.hessian_error is not None:
            assert r.hessian_error == pytest.approx(ref[r.path].hessian_error,
                                                    rel=1e-3 if ON_CPU else 2e-2)


def _attention_reference(q, k, v, scale, keep):
    """float64 ``softmax(scale q kᵀ) v`` over the keys ``keep (B, H, L, S)`` allows."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.where(keep, scale * q @ np.swapaxes(k, -1, -2), -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive", "shorter-queries"])
@pytest.mark.parametrize("chunk", [1 << 30, 100])
def test_numpy_attention_matches_float64_reference_and_mlx(mask, chunk):
    """Grouped-query attention with every mask form mlx-lm passes, in one chunk of scores and
    in many: within float32 rounding of a float64 reference and of MLX's own kernel."""
    from quantkit.kernels.attention import attention_numpy

    rng = np.random.default_rng(0)
    b, h, hk, s, d = 2, 6, 3, 29, 16
    n_q = 7 if mask == "shorter-queries" else s
    q = rng.standard_normal((b, h, n_q, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    keep = np.ones((b, h, n_q, s), dtype=bool)
    arg = None
    if mask in ("causal", "shorter-queries"):
        arg = "causal"
        keep = np.broadcast_to(np.tril(np.ones((n_q, s), dtype=bool), k=s - n_q), keep.shape)
    elif mask == "bool":
        arg = rng.random((n_q, s)) > 0.3
        arg[:, 0] = True  # every query sees a key
        keep = np.broadcast_to(arg, keep.shape)
    elif mask == "additive":
        arg = np.where(rng.random((b, 1, n_q, s)) > 0.3, 0.0, -np.inf).astype(np.float32)
        arg[..., 0] = 0.0
        keep = np.broadcast_to(arg == 0, keep.shape)
    out = attention_numpy(q, k, v, 0.3, arg, chunk=chunk)
    assert out.dtype == np.float32 and out.shape == (b, h, n_q, d)
    np.testing.assert_allclose(out, _attention_reference(q, k, v, 0.3, keep), atol=2e-6)
    mlx_mask = mx.array(arg) if isinstance(arg, np.ndarray) else arg
    ref = mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=0.3,
                                               mask=mlx_mask)
    np.testing.assert_allclose(out, np.array(ref), atol=2e-6)
    with pytest.raises(ValueError, match="mask must be"):
        attention_numpy(q, k, v, 0.3, "sliding")


def test_host_attention_hands_other_cases_to_mlx_and_is_put_back_on_error():
    """Inside ``host_attention`` a model's attention runs in NumPy only for float32 operands
    without a cache; the model module's function is restored even when the body raises."""
    from mlx_lm.models import base, llama
    from mlx_lm.models.cache import KVCache

    model = _tiny_llama()
    x = mx.random.randint(0, 256, (2, 12), key=mx.random.key(2))
    want = model(x)
    # The logits of exact attention against MLX's: float32 noise on a CPU; on a CUDA GPU the
    # model's TF32 matmuls carry the difference to ~1e-3 (measured on an H200: 1.2e-3 at most).
    atol = 1e-4 if ON_CPU else 5e-3
    with host.host_attention(model):
        assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
        np.testing.assert_allclose(np.array(model(x)), np.array(want), atol=atol)
        cache = [KVCache() for _ in model.layers]
        np.testing.assert_allclose(np.array(model(x, cache=cache)), np.array(want), atol=atol)
        q = mx.random.normal((1, 2, 4, 8)).astype(mx.bfloat16)
        half = llama.scaled_dot_product_attention(q, q, q, cache=None, scale=1.0, mask=None)
        assert half.dtype == mx.bfloat16  # handed to MLX: NumPy has no bfloat16
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    with pytest.raises(RuntimeError), host.host_attention(model):
        raise RuntimeError("boom")
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention


def test_reused_buffers_give_bitwise_the_same_results():
    """Inside ``reusing_buffers`` the linear, Hessian and attention products are written into
    pooled work arrays: every result is bit for bit what fresh arrays give, a result handed to
    MLX stays valid when the buffer is reused, and the pool is dropped on exit."""
    from quantkit.kernels.attention import attention_numpy

    rng = np.random.default_rng(1)
    layer = nn.Linear(48, 24, bias=True)
    xs = [mx.array(rng.standard_normal((2, 9, 48), dtype=np.float32)) for _ in range(3)]
    q = rng.standard_normal((2, 4, 9, 8), dtype=np.float32)
    k = rng.standard_normal((2, 2, 9, 8), dtype=np.float32)
    fresh_linear = [np.array(HostLinear(layer)(x)) for x in xs]
    fresh_h = HostHessianCollector(48)
    for x in xs:
        fresh_h.update(x)
    fresh_attention = attention_numpy(q, k, k, 0.5, "causal", chunk=40)
    with host.reusing_buffers():
        runner, pooled_h = HostLinear(layer), HostHessianCollector(48)
        outs = [runner(x) for x in xs]  # all three alive while the buffer is reused
        for x in xs:
            pooled_h.update(x)
        buf = host.work_buffer((18, 24), slot="linear")
        # One buffer per slot, whatever the shape: a smaller request is a view of its start.
        again, smaller = host.work_buffer((18, 24), slot="linear"), host.work_buffer((5, 7), slot="linear")
        assert again.ctypes.data == smaller.ctypes.data == buf.ctypes.data
        assert smaller.shape == (5, 7) and smaller.flags.c_contiguous
        assert not np.shares_memory(host.work_buffer((18, 24), slot="other"), buf)
        out = host.work_buffer(fresh_attention.shape, slot="attention")
        attention = attention_numpy(q, k, k, 0.5, "causal", chunk=40, out=out)
        assert attention is out
    assert all(np.array_equal(np.array(o), f) for o, f in zip(outs, fresh_linear))
    assert np.array_equal(np.array(pooled_h.stats().h), np.array(fresh_h.stats().h))
    assert np.array_equal(attention, fresh_attention)
    assert not np.shares_memory(host.work_buffer((18, 24), slot="linear"), buf)  # outside: new
    with pytest.raises(ValueError, match="C-contiguous float32"):
        attention_numpy(q, k, k, 0.5, None, out=np.empty((2, 4, 9, 8), dtype=np.float64))


def test_collection_passes_end_at_the_last_collected_input(monkeypatch):
    """A block's later collection passes stop once its last collector has its input (the
    down projection's product is not computed for nothing): the quantized model and every
    error figure are bit for bit those of whole passes."""
    from quantkit.pipeline import calibrate

    tokens = mx.random.randint(0, 256, (12, 32), key=mx.random.key(4))
    recipe = Recipe.uniform("gptq", bits=4, group_size=32)
    runs = {}
    real = host.linear_forward
    for cut in (True, False):
        if not cut:  # never learn the order: every pass runs whole
            monkeypatch.setattr(calibrate.TailCut, "end_pass",
                                lambda self: setattr(self, "seen", []))
        calls = []
        monkeypatch.setattr(host, "linear_forward", lambda *a, calls=calls: calls.append(1) or real(*a))
        model = _tiny_llama()
        report = ModelWalker(recipe=recipe, batch_size=4, backend="numpy").run(model, tokens).report
        runs[cut] = (dict(tree_flatten(model.parameters())), report, len(calls))
    (cut_params, cut_report, cut_calls), (whole_params, whole_report, whole_calls) = runs[True], runs[False]
    assert whole_calls - cut_calls == 2 * 2  # 2 blocks × the down projection of batches 2 and 3
    assert cut_params.keys() == whole_params.keys()
    assert all(np.array_equal(np.array(cut_params[k]), np.array(whole_params[k])) for k in cut_params)
    assert [(r.path, r.hessian_error, r.n_tokens) for r in cut_report.layers] == \
        [(r.path, r.hessian_error, r.n_tokens) for r in whole_report.layers]


def test_tail_cut_learns_the_order_and_stands_down_when_it_changes():
    from quantkit.pipeline.calibrate import PassEnd, TailCut

    tail = TailCut()
    for path in ("q", "k", "down"):  # the first pass runs whole and is learned
        tail.called(path)
    tail.end_pass()
    tail.called("q")
    tail.called("k")
    with pytest.raises(PassEnd):
        tail.called("down")
    tail.end_pass()
    tail.called("q")
    tail.called("v")  # another order (data-dependent control flow): no more cuts
    tail.called("k")
    tail.called("down")
    tail.end_pass()
    for path in ("q", "k", "down"):
        tail.called(path)
    assert not tail.enabled
