"""Mixture-of-experts: per-expert Hessians, expert batches, starved experts, model predicates.

Tiny random models of mlx-lm's mixtral, qwen3_moe and deepseek_v3 classes run everywhere; the
tests on ``../shared/models/stories260K-moe4`` compare with mlx-lm's own GPTQ (one Hessian shared
by all experts) under the same calibration.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from quantkit import GPTQQuantizer, QuantSpec, Recipe, RTNQuantizer, quantize_model
from quantkit.hessian import PerExpertHessianCollector
from quantkit.registry import DEFAULT_REGISTRY, SwitchLinearCatcher, SwitchLinearHandler

TINY = {
    "mixtral": dict(
        model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=256, norm_topk_prob=True,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=1, topk_group=1, first_k_dense_replace=1,
        max_position_embeddings=256,
    ),
}

RECIPE = Recipe.uniform(bits=4, group_size=32)
ON_GPU = mx.default_device() != mx.cpu


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random model of mlx-lm's class ``kind``: every parameter (routers included, which
    some classes start at zero) drawn from N(0, 0.1²), float32."""
    module = importlib.import_module(f"mlx_lm.models.{kind}")
    model = module.Model(module.ModelArgs.from_dict(TINY[kind]))
    mx.random.seed(seed)
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([
        (k, 1.0 + 0.1 * mx.random.normal(v.shape) if "norm" in k else 0.1 * mx.random.normal(v.shape))
        if mx.issubdtype(v.dtype, mx.floating) else (k, v) for k, v in params
    ]))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def registry_with(**options) -> object:
    registry = DEFAULT_REGISTRY.copy()
    registry.register(SwitchLinear, SwitchLinearHandler(**options))
    return registry


def tokens(n: int, seq: int, vocab: int = 128, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (n, seq)), dtype=mx.int32)


# -- the collector ------------------------------------------------------------------------------


def test_collector_routes_rows_to_their_experts():
    """Unsorted ``(B, L, 1, 1, in)`` inputs with ``(B, L, k)`` indices and sorted
    ``(N·k, 1, in)`` inputs both give each expert the Hessian of exactly its rows; an expert
    batch holds only its own Hessians; an expert with no rows has a zero Hessian, not NaN."""
    rng = np.random.default_rng(0)
    n_exp, dim = 5, 16
    x = rng.standard_normal((2, 7, 1, 1, dim)).astype(np.float32)
    idx = rng.integers(0, n_exp - 1, (2, 7, 2)).astype(np.int32)  # expert 4 never chosen
    xs = rng.standard_normal((9, 1, dim)).astype(np.float32)
    idx_s = np.sort(rng.integers(0, n_exp - 1, 9)).astype(np.int32)
    c = PerExpertHessianCollector(dim, n_exp, experts=range(2, 5))
    c.update(mx.array(x), mx.array(idx))
    c.update(mx.array(xs), mx.array(idx_s))
    st = c.stats()
    assert st.experts == (2, 3, 4) and st.n_tokens == 2 * 7 * 2 + 9
    rows_x = np.repeat(x.reshape(14, dim), 2, axis=0)
    all_rows = np.concatenate([rows_x, xs.reshape(9, dim)])
    all_idx = np.concatenate([idx.reshape(-1), idx_s])
    for i, e in enumerate(st.experts):
        r = all_rows[all_idx == e].astype(np.float64)
        assert st.expert_tokens[i] == len(r)
        ref = r.T @ r / max(len(r), 1)
        # The collector's xᵀx is an MLX float32 matmul: TF32 on a CUDA GPU (each term off by
        # ~2⁻¹⁰ relative; measured on an H200: 4e-4 on entries up to ~2), float32 on a CPU.
        atol = 1e-5 if not ON_GPU else 3e-3 * max(float(np.abs(ref).max()), 1.0)
        np.testing.assert_allclose(np.array(st.h[i]), ref, atol=atol)
    assert st.expert_tokens[2] == 0 and np.all(np.isfinite(np.array(st.h)))


# -- tiny models of three mlx-lm MoE classes ----------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_moe_models_quantize_per_expert(kind, tmp_path):
    """Each class: every SwitchLinear becomes a QuantizedSwitchLinear with one config entry per
    path, experts solved in batches of 2 (two passes) give the same weights as one batch, outputs
    stay finite and close to the float model's, and mlx-lm's loader reads the result back."""
    from mlx_lm.utils import load_model, save_config, save_model

    x = tokens(4, 32)
    ref = tiny_model(kind)
    results = {}
    for batch in (2, 4):
        model = tiny_model(kind)
        results[batch] = (model, quantize_model(model, x, RECIPE,
                                                registry=registry_with(expert_batch_size=batch)))
    model, result = results[2]
    switch = [p for p, m in tree_flatten(ref.leaf_modules(), is_leaf=nn.Module.is_module)
              if isinstance(m, SwitchLinear)]
    assert switch
    quantized = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    other = dict(tree_flatten(results[4][0].leaf_modules(), is_leaf=nn.Module.is_module))
    for path in switch:
        assert isinstance(quantized[path], QuantizedSwitchLinear)
        assert mx.array_equal(quantized[path].weight, other[path].weight)
        rec = [r for r in result.report.layers if r.path == path and r.expert is None]
        assert len(rec) == 1 and rec[0].strategy == "gptq" and rec[0].n_tokens > 0
        assert rec[0].hessian_error < rec[0].rtn_hessian_error
    # Evaluated with MLX's CPU kernels: on an H200, MLX 0.32.4's CUDA quantized matmul gave
    # qwen3_moe's 8-bit router (4 outputs, group 64) outputs unrelated to the CPU's for the same
    # arrays (relative difference 1.0), so the logits were 0.68 away there and 0.27 on the CPU
    # stream — an MLX kernel fault, not the quantized weights.
    with mx.stream(mx.cpu):
        logits = model(x)
        float_logits = ref(x)
        mx.eval(logits, float_logits)
    assert bool(mx.all(mx.isfinite(logits)))
    rel = float(mx.linalg.norm(logits - float_logits) / mx.linalg.norm(float_logits))
    assert rel < 0.5  # 4-bit random weights; routing flips included

    config = {**TINY[kind], "quantization": result.quantization}
    save_model(tmp_path, model, donate_model=False)
    save_config(config, config_path=tmp_path / "config.json")
    loaded, _ = load_model(tmp_path)
    with mx.stream(mx.cpu):  # the same kernels as ``logits`` (the router fault above)
        assert mx.allclose(loaded(x), logits, atol=1e-4)


def test_qwen3_moe_router_keeps_model_precision():
    """Qwen3-MoE's quant_predicate asks for an 8-bit, group-64 router (``mlp.gate``): the plan
    obeys it, the config records it, and an explicit recipe rule still wins."""
    model = tiny_model("qwen3_moe")
    result = quantize_model(model, tokens(2, 32), RECIPE)
    gate = "model.layers.0.mlp.gate"
    assert result.quantization[gate] == {"group_size": 64, "bits": 8, "mode": "affine"}
    rec = next(r for r in result.report.layers if r.path == gate)
    assert (rec.bits, rec.group_size) == (8, 64) and "quant_predicate" in rec.reason
    assert model.model.layers[0].mlp.gate.bits == 8
    assert "model.layers.0.mlp.switch_mlp.up_proj" not in result.quantization  # default 4/32

    recipe = Recipe.from_dict({"default": {"bits": 4, "group_size": 32},
                               "rules": [{"match": "*.mlp.gate", "bits": 6}]})
    result = quantize_model(tiny_model("qwen3_moe"), tokens(2, 32), recipe)
    assert result.quantization[gate]["bits"] == 6


def mixtral_without_expert_3() -> nn.Module:
    """The tiny mixtral with a router that never picks expert 3."""
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        gate = layer.block_sparse_moe.gate
        w = np.array(gate.weight)
        w[3] = 0.0
        gate.bias = mx.array([0.0, 0.0, 0.0, -1e4])  # nn.Linear adds it when present
        gate.weight = mx.array(w)
    return model


def test_zero_token_expert_falls_back_without_nan():
    """A router that never picks expert 3: its Hessian is empty, it is stored with round to
    nearest (bit-identical to mx.quantize), reported with 0 rows, and nothing turns NaN."""
    model = mixtral_without_expert_3()
    w3 = model.model.layers[0].block_sparse_moe.switch_mlp.down_proj.weight[3]
    result = quantize_model(model, tokens(2, 32), RECIPE)
    starved = [r for r in result.report.layers if r.expert is not None]
    assert {(r.path.split(".")[2], r.path.rsplit(".", 1)[1]) for r in starved} == {
        (b, p) for b in "01" for p in ("gate_proj", "up_proj", "down_proj")}
    assert all(r.expert == 3 and r.n_tokens == 0 and r.strategy == "rtn"
               and r.status == "fallback" and "starved" in r.reason for r in starved)
    q = model.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    ref_w, ref_s, ref_b = mx.quantize(w3, group_size=32, bits=4)
    assert mx.array_equal(q.weight[3], ref_w) and mx.allclose(q.scales[3], ref_s)
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            assert bool(mx.all(mx.isfinite(v)))
    assert bool(mx.all(mx.isfinite(model(tokens(1, 16)))))


def _never_route_expert_3(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        gate = layer.block_sparse_moe.gate
        gate.bias = mx.array([0.0, 0.0, 0.0, -1e4])
    return model


@pytest.mark.parametrize("case", ["plain", "starved", "shared", "blocked"])
def test_batched_expert_factors_equal_per_expert_path(case, monkeypatch):
    """Factorizing a batch's experts together (one ``factor_many``) stores what factorizing each
    expert alone does: on a CPU byte-identical packed weights and equal report figures, with
    NumPy's float64 factor and with the blocked MLX one (to tolerance on a GPU). ``starved``: expert 3 gets no tokens (a subset of
    the batch is factorized); ``shared``: one Hessian for all experts (factorized once)."""
    import quantkit.pipeline.expert_layers as moe

    recipe = Recipe.uniform(bits=4, group_size=32, linalg="blocked") if case == "blocked" \
        else RECIPE
    registry = registry_with(shared_hessian=case == "shared")
    calls = []

    def model():
        m = tiny_model("mixtral")
        return _never_route_expert_3(m) if case == "starved" else m

    def counting(*args, **kwargs):
        out = expert_factors(*args, **kwargs)
        calls.append(len(out))
        return out

    expert_factors = moe.expert_factors
    monkeypatch.setattr(moe, "expert_factors", counting)
    batched = model()
    res_b = quantize_model(batched, tokens(2, 32), recipe, registry=registry)
    # One call per Hessian: a SwitchGLU's up projection takes its gate projection's factors.
    assert calls == [3 if case == "starved" else 4] * 4
    monkeypatch.setattr(moe, "expert_factors", lambda *a, **k: {})
    alone = model()
    res_a = quantize_model(alone, tokens(2, 32), recipe, registry=registry)

    params_a = dict(tree_flatten(alone.parameters()))
    for k, v in tree_flatten(batched.parameters()):
        if not ON_GPU:  # same LAPACK / BLAS calls per matrix, stacked or not
            assert mx.array_equal(v, params_a[k]), k
        elif v.dtype == mx.uint32:  # GPU matmuls may tile a stack differently: rare code flips
            assert np.mean(np.array(v) != np.array(params_a[k])) < 0.05, k
        else:
            a = np.array(params_a[k].astype(mx.float32))
            np.testing.assert_allclose(np.array(v.astype(mx.float32)), a,
                                       atol=1e-3 * max(1.0, np.abs(a).max()), err_msg=k)
    for rb, ra in zip(res_b.report.layers, res_a.report.layers, strict=True):
        assert (rb.path, rb.expert, rb.status, rb.strategy, rb.damping, rb.n_tokens) == \
            (ra.path, ra.expert, ra.status, ra.strategy, ra.damping, ra.n_tokens)
        for name in ("hessian_error", "rtn_hessian_error", "relative_error"):
            a, b = getattr(ra, name), getattr(rb, name)
            assert (a is None and b is None) or b == pytest.approx(
                a, rel=2e-2 if ON_GPU else 1e-12), name


def test_starved_strategy_and_threshold_are_configurable():
    """A share threshold above every expert's share sends all experts to the ``starved``
    strategy; ``min_token_share=0`` sends none."""
    x = tokens(2, 32)
    result = quantize_model(tiny_model("mixtral"), x, RECIPE,
                            registry=registry_with(min_token_share=1.01, starved=RTNQuantizer()))
    layers = [r for r in result.report.layers if r.layer_class == "SwitchLinear"]
    assert all(r.strategy == "rtn" for r in layers)
    assert sum(r.expert is not None for r in layers) == 2 * 3 * 4
    result = quantize_model(tiny_model("mixtral"), x, RECIPE,
                            registry=registry_with(min_token_share=0.0))
    assert not [r for r in result.report.layers if r.expert is not None]


# -- the stories260K-moe4 fixture ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_fixture():
    from quantkit.calibration import make_batches, read_text, tokenize
    from quantkit.io import load_model

    path = shared_path("models", "stories260K-moe4")
    _, tokenizer, _ = load_model(path)
    shakespeare = tokenize(tokenizer, read_text(shared_path("text", "tinyshakespeare.txt")))
    stories = tokenize(tokenizer, read_text(shared_path("text", "tinystories_sample.txt")))
    return path, make_batches(shakespeare, 8, 256, seed=0), make_batches(stories, 16, 256, seed=0)


def _load_float(path):
    from quantkit.io import load_model

    model, _, _ = load_model(path)
    model.set_dtype(mx.float32)
    return model


class _Both:
    """Feeds one layer's calls to two collectors."""

    def __init__(self, *collectors):
        self.collectors = collectors

    def update(self, x, indices):
        for c in self.collectors:
            c.update(x, indices)


def _h_error(w, w_hat, h) -> float:
    d = np.array(w, np.float64) - np.array(w_hat, np.float64)
    return float(np.einsum("ij,ij->", d @ h, d))


@pytest.mark.slow
def test_per_expert_hessians_beat_a_shared_one_on_every_w2(moe_fixture):
    """On each expert's down projection (w2), GPTQ with the expert's own Hessian has lower
    Hessian-weighted error — measured with that expert's Hessian — than GPTQ with one Hessian
    over all experts' rows (mlx-lm's way)."""
    path, cal, _ = moe_fixture
    model = _load_float(path)
    spec, gptq = QuantSpec(bits=4, group_size=32), GPTQQuantizer()
    for block in (0, 3):
        key = f"model.layers.{block}.block_sparse_moe.switch_mlp.down_proj"
        layer = model.model.layers[block].block_sparse_moe.switch_mlp.down_proj
        n_exp, _, dim = layer.weight.shape
        own = PerExpertHessianCollector(dim, n_exp)
        shared = PerExpertHessianCollector(dim, n_exp, shared=True)

        model.update_modules(tree_unflatten([(key, SwitchLinearCatcher(layer, _Both(own, shared)))]))
        model(cal[:4])
        model.update_modules(tree_unflatten([(key, layer)]))
        s_own, s_shared = own.stats(), shared.stats()
        for e in range(n_exp):
            w = layer.weight[e]
            h = np.array(s_own.h[e], dtype=np.float64)

            e_own = _h_error(w, gptq.quantize(w, spec, s_own.expert(e)).dequantized, h)
            e_shared = _h_error(w, gptq.quantize(w, spec, s_shared.expert(e)).dequantized, h)
            assert e_own < e_shared, (block, e, e_own, e_shared)


@pytest.mark.slow
def test_fixture_perplexity_below_mlx_lm_gptq(moe_fixture):
    """4-bit group-32 on stories260K-moe4, calibration tinyshakespeare 8×256, perplexity on
    tinystories 16×256: quantkit (per-expert Hessians) below mlx-lm's ``gptq_quantize`` (one
    shared Hessian). The tied embedding, which mlx-lm's GPTQ leaves to its round-to-nearest
    fallback (6-bit, group 64 by default), gets the same treatment in both."""
    from mlx_lm.quant.gptq import gptq_quantize

    from quantkit import perplexity

    path, cal, evaluation = moe_fixture
    reference = _load_float(path)
    gptq_quantize(reference, cal, 4, 32, 6, 64)
    ppl_mlx_lm = perplexity(reference, evaluation)
    model = _load_float(path)
    recipe = Recipe.from_dict({
        "default": {"bits": 4, "group_size": 32},
        "rules": [{"match": "model.embed_tokens", "strategy": "rtn", "bits": 6, "group_size": 64}],
    })
    quantize_model(model, cal, recipe)
    ppl = perplexity(model, evaluation)
    assert math.isfinite(ppl) and ppl < ppl_mlx_lm, (ppl, ppl_mlx_lm)


def _starve_last_expert(model_dir, tokens: mx.array) -> None:
    """Make sure the last expert of every layer is starved. (``make_moe_fixture.py --starve``
    sets its router row to ``-50·|g|``, but router inputs have both signs, so here that expert
    still gets ~20% of the rows.) The row is set along minus the mean router input, which has
    a positive projection on every token, so the expert's logit is far below the others."""
    from quantkit.io import load_model

    model, _, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    inputs: dict[int, list[mx.array]] = {}

    class Catch(nn.Module):
        def __init__(self, gate, i):
            super().__init__()
            self.gate, self.i = gate, i

        def __call__(self, x):
            inputs.setdefault(self.i, []).append(x.reshape(-1, x.shape[-1]))
            return self.gate(x)

    for i, layer in enumerate(model.model.layers):
        layer.block_sparse_moe.gate = Catch(layer.block_sparse_moe.gate, i)
    model(tokens)
    weights = mx.load(str(model_dir / "model.safetensors"))
    for i, xs in inputs.items():
        mean = mx.concatenate(xs).mean(axis=0)
        key = f"model.layers.{i}.block_sparse_moe.gate.weight"
        g = weights[key]
        weights[key] = mx.concatenate([g[:-1], (-50.0 * mean / mx.linalg.norm(mean))[None]])
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})


@pytest.mark.slow
def test_starved_expert_reported_falls_back_and_loads(tmp_path):
    """The ``--starve`` fixture: its last expert gets (almost) no tokens, is reported with its
    token count and stored with round to nearest; the output is finite and mlx_lm.load reads
    it."""
    import mlx_lm

    from quantkit import perplexity, quantize_directory
    from quantkit.calibration import make_batches, read_text, tokenize

    src = shared_path("models", "stories260K-pad192")
    tool = shared_path("tools", "make_moe_fixture.py")
    text = shared_path("text", "tinyshakespeare.txt")
    starved_dir = tmp_path / "starved"
    subprocess.run([sys.executable, str(tool), str(src), str(starved_dir), "--starve"],
                   check=True, capture_output=True)
    _, tokenizer = mlx_lm.load(str(starved_dir))
    _starve_last_expert(starved_dir, make_batches(tokenize(tokenizer, read_text(text)), 2, 256))
    out = quantize_directory(
        starved_dir, tmp_path / "q", Recipe.uniform(bits=4, group_size=32),
        calibration=text, num_samples=2, seq_len=256,
    )
    experts = [r for r in out.report.layers if r.expert is not None]
    assert len(experts) == 5 * 3 and {r.expert for r in experts} == {3}
    for r in experts:
        assert r.status == "fallback" and r.strategy == "rtn" and r.n_tokens is not None
        assert r.n_tokens < 0.005 * 2 * 256 and "starved" in r.reason
    layer = next(r for r in out.report.layers if r.path == experts[0].path and r.expert is None)
    assert layer.status == "quantized" and "3 (" in layer.reason

    model, tokenizer = mlx_lm.load(str(tmp_path / "q"))
    assert isinstance(model.model.layers[0].block_sparse_moe.switch_mlp.down_proj,
                      QuantizedSwitchLinear)
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            assert bool(mx.all(mx.isfinite(v)))
    ids = tokenize(tokenizer, read_text(shared_path("text", "tinystories_sample.txt")))
    assert perplexity(model, make_batches(ids, 4, 256, seed=0)) < 20
    saved = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert sum(r["expert"] == 3 for r in saved["layers"]) == 15


def test_rtn_recipe_needs_no_calibration_pass():
    """A calibration-free recipe stores expert layers with round to nearest, no expert records."""
    model = tiny_model("mixtral")
    result = quantize_model(model, tokens(1, 8), Recipe.uniform("rtn", bits=4, group_size=32))
    layers = [r for r in result.report.layers if r.layer_class == "SwitchLinear"]
    assert layers and all(r.strategy == "rtn" and r.expert is None for r in layers)
    assert isinstance(model.model.layers[0].block_sparse_moe.switch_mlp.up_proj,
                      QuantizedSwitchLinear)


def test_apply_predicate_false_true_and_dict():
    """``False`` keeps full precision; ``True`` keeps the recipe's spec; a dict without ``mode``
    means affine (as ``to_quantized``), and keys a spec cannot hold are named in the note."""
    from quantkit.predicate import apply_predicate

    spec = QuantSpec(bits=4, group_size=32)
    layer = nn.Linear(64, 8)
    assert apply_predicate(lambda p, m: False, "a.gate", layer, spec)[0] is None
    assert apply_predicate(lambda p, m: True, "a.gate", layer, spec) == (spec, None)
    wanted, note = apply_predicate(
        lambda p, m: {"bits": 8, "group_size": 64, "global_scale": True}, "a.gate", layer,
        QuantSpec(bits=4, group_size=32, mode="mxfp4"),
    )
    assert wanted == QuantSpec(bits=8, group_size=64, mode="affine") and "global_scale" in note


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_up_projection_takes_the_gate_projections_hessians(kind, monkeypatch):
    """A ``SwitchGLU`` calls its gate and up projections with the same inputs: collecting and
    factorizing their Hessians once (the up projection takes the gate's) gives the bytes and
    figures that collecting each layer's own does, with half the Hessians held."""
    import quantkit.walker as walker

    shared = []
    same_input = walker.same_input  # quantkit.pipeline.expert_layers.same_input, as the walker calls it

    def spy(model, plans):
        shared.append(same_input(model, plans))
        return shared[-1]

    outputs = []
    for share in (True, False):
        monkeypatch.setattr(walker, "same_input", spy if share else lambda model, plans: {})
        model = tiny_model(kind)
        result = quantize_model(model, tokens(4, 16), RECIPE,
                                registry=registry_with(expert_batch_size=2))
        outputs.append((dict(tree_flatten(model.parameters())),
                        [(r.path, r.expert, r.status, r.hessian_error, r.damping)
                         for r in result.report.layers]))
    assert all(len(s) == 1 and next(iter(s)).endswith(".up_proj") for s in shared), shared
    (new, new_report), (old, old_report) = outputs
    assert new_report == old_report
    for k, v in new.items():
        assert bool(mx.array_equal(v, old[k])), k
