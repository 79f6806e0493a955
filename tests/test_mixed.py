"""Mixed precision to a bits-per-weight target, and GPTAQ, on stories260K-pad192."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import shared_path
from mlx.utils import tree_flatten
from reference import affine_params_ref
from test_kernels import correlated_inputs
from typer.testing import CliRunner

from quantkit import DampedCholesky, Recipe, quantize_directory, quantize_model
from quantkit.cli import app
from quantkit.io import load_model
from quantkit.kernels.gptaq import asymmetry_matrix, gptaq_quantize
from quantkit.kernels.gptq import gptq_quantize
from quantkit.mixed import BudgetError, LayerOptions, allocate, storage_bits
from quantkit.specs import QuantSpec


@pytest.fixture(scope="module")
def pad_dir():
    return shared_path("models", "stories260K-pad192")


# -- allocation (pure) ----------------------------------------------------------------------

def options(path: str, n: int, scale: float) -> LayerOptions:
    """A layer whose error at b bits is ``scale · 4^-b`` (each bit quarters the error)."""
    specs = [QuantSpec(b, 64) for b in (2, 3, 4, 5, 6, 8)]
    return LayerOptions(path, n, tuple((storage_bits(s, n, 16), scale * 4.0 ** -s.bits, s)
                                       for s in specs))


def test_allocation_meets_the_budget_and_gives_sensitive_layers_more_bits():
    n = 64 * 64
    layers = [options("a", n, 100.0), options("b", n, 1.0), options("c", n, 10.0)]
    budget = 3 * n * 4.5  # 4.5 bits per weight on average
    specs = allocate(layers, budget)
    cost = sum(storage_bits(specs[lo.path], n, 16) for lo in layers)
    assert cost <= budget
    assert specs["a"].bits > specs["c"].bits > specs["b"].bits
    # leftover bits are used: one more upgrade would not fit
    assert budget - cost < n  # less than one extra bit per weight of one layer left


def test_allocation_rejects_an_impossible_target():
    n = 64 * 64
    with pytest.raises(BudgetError, match="cheapest"):
        allocate([options("a", n, 1.0)], budget_bits=n * 2.0)


# -- end to end: plan, CLI, recipe round trip ------------------------------------------------

def test_target_bpw_plan_loads_and_its_recipe_reproduces_it(pad_dir, tinystories_text, tmp_path):
    from mlx_lm import load

    runner = CliRunner()
    out = tmp_path / "mixed"
    common = ["--calibration", str(tinystories_text), "--num-samples", "4", "--seq-len", "64"]
    result = runner.invoke(app, ["quantize", str(pad_dir), "-o", str(out), "--target-bpw", "4.5",
                                 *common])
    assert result.exit_code == 0, result.output
    assert "recipe.toml" in " ".join(result.stderr.split())
    report = json.loads((out / "quantization_report.json").read_text())
    assert 4.3 < report["bits_per_weight"] <= 4.5  # counted as mlx-lm counts it
    config = json.loads((out / "config.json").read_text())["quantization"]
    widths = {v["bits"] for v in config.values() if isinstance(v, dict)} | {config["bits"]}
    assert len(widths) > 1  # really mixed

    model, _ = load(str(out))  # mlx_lm reads the per-layer settings unchanged
    assert model.model.layers[0].self_attn.q_proj.bits in widths

    recipe_text = (out / "recipe.toml").read_text()
    assert recipe_text.startswith("# Mixed-precision plan")
    again = tmp_path / "again"
    result = runner.invoke(app, ["quantize", str(pad_dir), "-o", str(again), "--recipe",
                                 str(out / "recipe.toml"), *common])
    assert result.exit_code == 0, result.output
    assert json.loads((again / "config.json").read_text())["quantization"] == config


def test_sensitive_layers_get_more_bits(pad_dir, stories_tokens):
    from quantkit.mixed import measure_sensitivity

    model, _, _ = load_model(pad_dir)
    calib, _ = stories_tokens
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    sens = measure_sensitivity(model, calib[:8], reference_bpw=4.5, sensitivity="fisher",
                               candidates=[QuantSpec(b, 64) for b in (2, 3, 4, 5, 6)])
    # the model is left as it was
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    assert all(np.array_equal(np.array(after[k]), before[k]) for k in before)

    plan = sens.plan(4.5)
    assert plan.bits_per_weight <= 4.5
    # rank equal-sized layers by their predicted error at 3 bits: the most sensitive third
    # gets more bits on average than the least sensitive third
    same = [lo for lo in sens.layers if lo.n_params == 64 * 64]
    err3 = sorted(same, key=lambda lo: next(e for _, e, s in lo.options if s.bits == 3))
    third = len(err3) // 3
    low = np.mean([plan.specs[lo.path].bits for lo in err3[:third]])
    high = np.mean([plan.specs[lo.path].bits for lo in err3[-third:]])
    assert high > low

    # the planned bits per weight is exactly what the quantized model reports
    from mlx_lm.utils import compute_bits_per_weight

    quantize_model(model, calib[:8], plan.recipe)
    assert compute_bits_per_weight(model) == pytest.approx(plan.bits_per_weight, rel=1e-9)


def test_streamed_measurement_is_the_in_memory_one(pad_dir, stories_tokens):
    """Measured streamed (the model read lazily; the KL probe's copy run a block at a time,
    read back from scratch files; the walk's finished blocks written out and their float
    weights freed), every layer's figures, costs and the fixed bits are exactly the ones the
    in-memory measurement gives."""
    from quantkit.mixed import measure_sensitivity

    calib, _ = stories_tokens
    kwargs = dict(reference_bpw=4.5, sensitivity="kl-fast", fisher_samples=1,
                  candidates=[QuantSpec(b, 64) for b in (3, 4, 6)])
    model, _, _ = load_model(pad_dir)
    in_memory = measure_sensitivity(model, calib[:4], **kwargs)
    lazy, _, _ = load_model(pad_dir, lazy=True)
    streamed = measure_sensitivity(
        lazy, calib[:4], **kwargs, reload=lambda: load_model(pad_dir, lazy=True, check_finite=False)[0])
    assert streamed.layers and all(len(lo.options) == 3 for lo in streamed.layers)
    assert streamed == in_memory


def test_plan_keeps_the_base_recipes_skips_and_strategy(pad_dir, stories_tokens):
    from quantkit.mixed import plan_mixed_precision

    model, _, _ = load_model(pad_dir)
    calib, _ = stories_tokens
    base = Recipe.from_dict({"default": {"strategy": "rtn"},
                             "rules": [{"match": "model.embed_tokens", "strategy": "skip"}]})
    plan = plan_mixed_precision(model, calib[:4], 8.0, recipe=base, sensitivity="output",
                                candidates=[QuantSpec(3, 64), QuantSpec(4, 64)])
    assert plan.recipe.resolve("model.embed_tokens")[1].skip
    assert plan.recipe.default.strategy == "rtn"
    assert "model.embed_tokens" not in plan.specs
    assert plan.bits_per_weight <= 8.0


def test_plan_keeps_the_base_recipes_embedding_and_distill_tables():
    """The written plan runs the base pipeline at the planned bits: its [embedding] and
    [distill] tables (the default pipeline's) stay in it."""
    from quantkit.defaults import default_recipe
    from quantkit.mixed import _plan_recipe

    base = default_recipe()
    plan = _plan_recipe(base, ["model.layers.0.mlp.up_proj"],
                        {"model.layers.0.mlp.up_proj": QuantSpec(3, 64)})
    assert plan.distill == base.distill is not None
    assert plan.embedding == base.embedding and plan.optimizers == base.optimizers
    assert plan.resolve("model.layers.0.mlp.up_proj")[1].spec.bits == 3


# -- GPTAQ ----------------------------------------------------------------------------------

def gptaq_ref(w, h, d, bits, group_size, alpha, damping=0.01):
    """GPTAQ column by column in float64: GPTQ's update plus ``w_j · P[j]``, with
    ``P = α triu₁(D Uᵀ) U`` (arXiv:2504.02692)."""
    w = np.array(w, dtype=np.float64)
    n = h.shape[0]
    hd = h + damping * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    p = alpha * np.triu(d @ u.T, k=1) @ u
    n_levels = 2**bits - 1
    deq = np.zeros_like(w)
    for j in range(n):
        if j % group_size == 0:
            s, b = affine_params_ref(w[:, j : j + group_size], bits, group_size)
            s, b = s[:, 0], b[:, 0]
        col = w[:, j].copy()
        deq[:, j] = np.clip(np.round((col - b) / s), 0, n_levels) * s + b
        err = (col - deq[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:]) - np.outer(col, p[j, j:])
    return deq


def test_gptaq_kernel_matches_float64_reference_and_reduces_to_gptq():
    x = correlated_inputs(4096, 128, seed=3)
    xq = x + 0.1 * correlated_inputs(4096, 128, seed=4)  # "quantized-model" inputs
    h = xq.T @ xq / len(x)
    d = (x - xq).T @ xq / len(x)
    w = np.random.default_rng(3).normal(size=(32, 128)) * 0.05
    u = DampedCholesky(0.01).factor(mx.array(h.astype(np.float32))).u
    p = asymmetry_matrix(np.array(u, dtype=np.float64), d, alpha=1.0)
    out = gptaq_quantize(mx.array(w.astype(np.float32)), u, mx.array(p.astype(np.float32)),
                         bits=3, group_size=32, block_size=64)  # exercises the lazy update
    ref = gptaq_ref(w, h, d, 3, 32, alpha=1.0)
    target = lambda v: np.sum((v @ xq.T - w @ x.T) ** 2) / len(x)  # noqa: E731
    assert target(np.array(out.dequantized)) == pytest.approx(target(ref), rel=0.02)

    # with the asymmetry term the fit to the full-precision outputs is better than GPTQ's
    plain = gptq_quantize(mx.array(w.astype(np.float32)), u, bits=3, group_size=32, block_size=64)
    assert target(np.array(out.dequantized)) < target(np.array(plain.dequantized))
    zero = gptaq_quantize(mx.array(w.astype(np.float32)), u, mx.zeros_like(u), bits=3,
                          group_size=32, block_size=64)
    assert np.array_equal(np.array(zero.codes), np.array(plain.codes))


def test_gptaq_runs_and_its_hessian_error_is_sane(pad_dir, stories_tokens):
    import attrs

    from quantkit.walker import ModelWalker

    @attrs.define
    class Spy(ModelWalker):
        """Records how large each layer's D = mean((x − x̃) x̃ᵀ) came out."""

        d_max: dict = attrs.field(factory=dict)

        def quantize_layer(self, p, stats, result=None, factor=None):
            if getattr(stats, "d", None) is not None:
                self.d_max[p.path] = float(mx.abs(stats.d).max())
            return super().quantize_layer(p, stats, result, factor)

    model, _, _ = load_model(pad_dir)
    calib, _ = stories_tokens
    walker = Spy(recipe=Recipe.uniform("gptaq", 3, 32))
    result = walker.run(model, calib[:8])
    layers = [r for r in result.report.layers if r.hessian_error is not None]
    assert {r.strategy for r in layers} == {"gptaq"}
    for r in layers:
        # it fits a different target than GPTQ, but stays well below round to nearest
        assert r.hessian_error <= 1.05 * r.rtn_hessian_error, r.path
    assert all(np.isfinite(r.relative_error) and r.relative_error < 0.2 for r in layers)
    # block 0 sees identical inputs in both streams; later blocks see the accumulated error;
    # the output head has no full-precision stream (plain GPTQ)
    assert walker.d_max["model.layers.0.self_attn.q_proj"] == 0.0
    assert walker.d_max["model.layers.3.self_attn.q_proj"] > 0.0
    assert walker.d_max["model.layers.3.mlp.down_proj"] > 0.0
    assert "model.embed_tokens" not in walker.d_max


def test_gptaq_output_loads(pad_dir, tinystories_text, tmp_path):
    from mlx_lm import load

    run = quantize_directory(pad_dir, tmp_path / "a", Recipe.uniform("gptaq", 4, 64, alpha=0.5),
                             calibration=tinystories_text, num_samples=4, seq_len=128)
    assert run.report.settings["recipe"]["default"]["alpha"] == 0.5
    model, _ = load(str(run.out_dir))
    assert model.model.layers[1].mlp.down_proj.bits == 4


def test_gptaq_slices_use_the_asymmetry_term():
    """What the walker calls (``quantize_chunks``) is GPTAQ's solve, not GPTQ's: equal to
    GPTAQ's ``quantize`` and different from GPTQ's result on the same statistics."""
    from quantkit.gptaq import AsymmetricStats, GPTAQQuantizer
    from quantkit.quantizers import GPTQQuantizer

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2048, 128)).astype(np.float32)
    xq = x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    stats = AsymmetricStats(h=mx.array(xq.T @ xq / len(x)), n_tokens=len(x),
                            d=mx.array((x - xq).T @ xq / len(x)))
    w = mx.array(rng.standard_normal((96, 128)).astype(np.float32))
    spec = QuantSpec(3, 32)
    gptaq = GPTAQQuantizer(alpha=1.0)
    chunks = list(gptaq.quantize_chunks(w.astype(mx.bfloat16), spec, stats))
    assert [rows for rows, _ in chunks] == [slice(0, 96)]
    whole = gptaq.quantize(w.astype(mx.bfloat16).astype(mx.float32), spec, stats)
    assert mx.array_equal(chunks[0][1].codes, whole.codes).item()
    plain = GPTQQuantizer().quantize(w.astype(mx.bfloat16).astype(mx.float32), spec, stats)
    assert not mx.array_equal(whole.codes, plain.codes).item()
