"""Block methods for quality: activation-aware scaling (AWQ) keeps the float function, learned
rounding never increases the block objective it minimises, both are deterministic, and the
output still loads in mlx_lm."""

from __future__ import annotations

import copy

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path
from mlx_lm.models import llama

from quantkit.arch import LLAMA, ArchSpec, ScaleGroup
from quantkit.blocks import BlockContext
from quantkit.blocks.awq import ActivationAwareScaling
from quantkit.blocks.rounding import LearnedRounding
from quantkit.evaluate import perplexity
from quantkit.io import load_model
from quantkit.kernels.awq import awq_scales, fold_into_norm, fold_into_rows, scale_columns
from quantkit.specs import QuantSpec

MIXTRAL = ArchSpec(
    model_types=("mixtral",),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm",
                   ("block_sparse_moe.gate", "block_sparse_moe.switch_mlp.gate_proj",
                    "block_sparse_moe.switch_mlp.up_proj"), scope="block_sparse_moe"),
        ScaleGroup("block_sparse_moe.switch_mlp.up_proj",
                   ("block_sparse_moe.switch_mlp.down_proj",), kind="linear"),
    ),
)


def tiny_llama(kv_heads: int = 4) -> nn.Module:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, vocab_size=96,
        tie_word_embeddings=True))
    # Norm weights and activations far from uniform, as in trained models.
    for layer in model.layers:
        layer.input_layernorm.weight = mx.random.uniform(0.2, 3.0, (64,))
        layer.post_attention_layernorm.weight = mx.random.uniform(0.2, 3.0, (64,))
    model.set_dtype(mx.float32)
    return model


def block_context(model: nn.Module, arch: ArchSpec, tokens: mx.array, index: int = 0,
                  batches: int = 2) -> BlockContext:
    h = model.model.embed_tokens(tokens)
    for layer in model.model.layers[:index]:
        h = layer(h, "causal", None)
    inputs = [mx.array(x) for x in mx.split(h, batches)]
    block = model.model.layers[index]
    return BlockContext(index, f"model.layers.{index}", block, inputs,
                        lambda m, j: m(inputs[j], "causal", None), arch)


def block_outputs(ctx: BlockContext) -> list[np.ndarray]:
    return [np.array(ctx.forward(ctx.block, j)) for j in range(len(ctx.inputs))]


# -- kernels --------------------------------------------------------------------------------

def test_awq_kernels_match_float64():
    rng = np.random.default_rng(0)
    m = rng.uniform(0.01, 5.0, 32)
    for alpha in (0.0, 0.35, 0.9):
        s = np.maximum(m ** alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        np.testing.assert_allclose(np.array(awq_scales(mx.array(m, dtype=mx.float32), alpha)), s,
                                   rtol=1e-5)
    s = rng.uniform(0.5, 2.0, 32)
    w = rng.normal(size=(8, 32))
    norm = rng.normal(size=32)
    x = rng.normal(size=(5, 32))
    # Folding keeps the product: (x * (norm + o) / s) @ (w * s).T == (x * (norm + o)) @ w.T
    for offset in (0.0, 1.0):
        n2 = np.array(fold_into_norm(mx.array(norm, dtype=mx.float32), mx.array(s, dtype=mx.float32),
                                     offset), dtype=np.float64)
        w2 = np.array(scale_columns(mx.array(w, dtype=mx.float32), mx.array(s, dtype=mx.float32)),
                      dtype=np.float64)
        np.testing.assert_allclose((x * (n2 + offset)) @ w2.T, (x * (norm + offset)) @ w.T,
                                   rtol=1e-4, atol=1e-4)
    src = rng.normal(size=(32, 16))
    s2 = np.array(fold_into_rows(mx.array(src, dtype=mx.float32), mx.array(s, dtype=mx.float32)))
    np.testing.assert_allclose(s2, src / s[:, None], rtol=1e-6)


# -- AWQ keeps the float function -------------------------------------------------------------

def _check_float_function(ctx: BlockContext, transform) -> dict:
    before = block_outputs(ctx)
    figures = transform.apply(ctx)
    after = block_outputs(ctx)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max())
    return figures


def test_awq_keeps_float_function_tiny_llama():
    model = tiny_llama()
    tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
    ctx = block_context(model, LLAMA, tokens)
    figures = _check_float_function(ctx, ActivationAwareScaling(bits=3, group_size=32))
    assert len(figures["groups"]) == 4
    for g in figures["groups"]:
        assert g["error"] <= g["error_unscaled"]
    assert any(g["alpha"] > 0 for g in figures["groups"])


def test_awq_skips_mismatched_group_with_grouped_query_attention():
    model = tiny_llama(kv_heads=2)
    tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
    ctx = block_context(model, LLAMA, tokens)
    figures = _check_float_function(ctx, ActivationAwareScaling(bits=3, group_size=32))
    assert [g["source"] for g in figures["groups"]] == [
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert any("self_attn.v_proj" in s for s in figures["skipped"])


def _stories_tokens(model_dir, n=4, length=64):
    from quantkit.calibration import make_batches, read_text, tokenize

    _, tok, _ = load_model(model_dir)
    ids = tokenize(tok, read_text(shared_path("text", "tinyshakespeare.txt")))
    return make_batches(ids, n, length, seed=0)


@pytest.mark.parametrize("name,arch", [("stories260K-pad192", LLAMA), ("stories260K-moe4", MIXTRAL)])
def test_awq_keeps_float_function_stories(name, arch):
    model_dir = shared_path("models", name)
    model, _, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    tokens = _stories_tokens(model_dir)
    ctx = block_context(model, arch, tokens, index=1)
    figures = _check_float_function(ctx, ActivationAwareScaling(bits=3, group_size=32, n_grid=10))
    assert figures["groups"]
    for g in figures["groups"]:
        assert g["error"] <= g["error_unscaled"]


def test_awq_spec_from_options_then_run_default():
    t = ActivationAwareScaling(group_size=32)
    assert t.spec_for(QuantSpec(bits=2, group_size=64)) == QuantSpec(bits=2, group_size=32)
    assert t.spec_for(None) == QuantSpec(group_size=32)
    assert ActivationAwareScaling().spec_for(QuantSpec(bits=3)) == QuantSpec(bits=3)


# -- learned rounding -------------------------------------------------------------------------

def _quantized_block(model: nn.Module, arch: ArchSpec, tokens: mx.array, bits: int,
                     index: int = 0, first_scale: float = 1.0
                     ) -> tuple[BlockContext, list[mx.array]]:
    """Block ``index`` RTN-quantized in MLX's format, with its float layers and outputs
    (``first_scale``: the hidden state of each sequence's first position multiplied by it, as
    the massive first position of trained models)."""
    from mlx.utils import tree_flatten

    ctx = block_context(model, arch, tokens, index=index)
    if first_scale != 1.0:
        inputs = [mx.concatenate([first_scale * x[:, :1], x[:, 1:]], axis=1) for x in ctx.inputs]
        ctx = attrs.evolve(ctx, inputs=inputs,
                           forward=lambda m, j: m(inputs[j], "causal", None))
    targets = [ctx.forward(ctx.block, j) for j in range(len(ctx.inputs))]
    mx.eval(targets)
    floats = {}
    for path, m in tree_flatten(ctx.block.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(m, "to_quantized") and "weight" in m:
            floats[path] = copy.copy(m)
    nn.quantize(ctx.block, group_size=32, bits=bits,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("gate"))
    return attrs.evolve(ctx, float_layers=floats, seed=3), targets


def _block_loss(ctx: BlockContext, targets) -> float:
    total = sum(float(mx.sum(mx.square(ctx.forward(ctx.block, j) - targets[j])).item())
                for j in range(len(ctx.inputs)))
    return total / sum(t.size for t in targets)


def _quantized_bytes(block: nn.Module) -> dict[str, bytes]:
    from mlx.utils import tree_flatten

    return {k: np.array(v).tobytes() for k, v in tree_flatten(block.parameters())}


@pytest.mark.parametrize("method", ["signround", "scales"])
def test_learned_rounding_lowers_block_objective_and_is_deterministic(method):
    runs = []
    for _ in range(2):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        before = _block_loss(ctx, targets)
        figures = LearnedRounding(method=method, steps=40, eval_every=5).optimize(ctx, targets)
        after = _block_loss(ctx, targets)  # through MLX's quantized layers, as stored
        assert figures["loss_before"] == pytest.approx(before, rel=1e-3)
        assert figures["loss_after"] == pytest.approx(after, rel=1e-3)
        assert after < before
        runs.append(_quantized_bytes(ctx.block))
    assert runs[0] == runs[1]


def test_learned_rounding_keeps_the_solve_when_no_step_helps():
    model = tiny_llama()
    tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
    ctx, targets = _quantized_block(model, LLAMA, tokens, bits=4)
    start = _quantized_bytes(ctx.block)
    # A step size so large that every step overshoots: no iterate beats the start.
    figures = LearnedRounding(method="scales", steps=3, lr=0.5, eval_every=1).optimize(ctx, targets)
    if figures["best_step"] == 0:
        assert _quantized_bytes(ctx.block) == start
    assert figures["loss_after"] <= figures["loss_before"]
    assert _block_loss(ctx, targets) <= figures["loss_before"] * (1 + 1e-4)


def test_learned_rounding_tunes_experts_stories_moe():
    model_dir = shared_path("models", "stories260K-moe4")
    model, _, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    ctx, targets = _quantized_block(model, MIXTRAL, _stories_tokens(model_dir), bits=2, index=1)
    experts = ctx.block.block_sparse_moe.switch_mlp.down_proj
    codes_before, scales_before = np.array(experts.weight), np.array(experts.scales)
    figures = LearnedRounding(method="signround", steps=20, eval_every=5).optimize(ctx, targets)
    assert figures["loss_after"] < figures["loss_before"]
    assert figures["loss_after"] == pytest.approx(_block_loss(ctx, targets), rel=1e-3)
    assert not np.array_equal(np.array(experts.weight), codes_before)
    assert not np.array_equal(np.array(experts.scales), scales_before)


# -- the whole walk: AWQ + GPTQ + learned rounding, written and read by mlx_lm ----------------

@pytest.mark.parametrize("norm_step", [0.0, 1.0])
def test_awq_gptq_learned_rounding_output_loads_in_mlx_lm(tmp_path, norm_step):
    import mlx_lm

    from quantkit import Recipe
    from quantkit.io import save_model
    from quantkit.walker import ModelWalker

    model_dir = shared_path("models", "stories260K-pad192")
    model, _, config = load_model(model_dir)
    tokens = _stories_tokens(model_dir, n=8, length=64)
    float_ppl = perplexity(model, tokens)
    events = []
    recipe = attrs.evolve(Recipe.uniform("gptq", bits=3, group_size=32),
                          transforms=(ActivationAwareScaling(n_grid=5),),
                          optimizers=(LearnedRounding(steps=10, eval_every=5,
                                                      norm_step=norm_step),))
    walker = ModelWalker(recipe=recipe, progress=lambda e, info: events.append((e, info)))
    result = walker.run(model, tokens)
    tuned = [i["figures"] for e, i in events if e == "optimizer"]
    assert len(tuned) == len(model.layers)
    assert all(f["loss_after"] <= f["loss_before"] for f in tuned)
    assert len([e for e, _ in events if e == "transform"]) == len(model.layers)
    out = save_model(tmp_path / "q", model, {**config, "quantization": result.quantization},
                     model_dir)
    loaded, tokenizer = mlx_lm.load(str(out))
    text = mlx_lm.generate(loaded, tokenizer, prompt="Once upon a time", max_tokens=1)
    assert isinstance(text, str)
    ppl = perplexity(loaded, tokens)
    assert ppl == pytest.approx(perplexity(model, tokens), rel=1e-3)  # what was tuned is stored
    assert ppl < 2 * float_ppl


# -- Hessian shrinkage for experts ------------------------------------------------------------

def test_shrink_matches_float64_and_collector_blends_by_token_count():
    from quantkit.hessian import PerExpertHessianCollector
    from quantkit.kernels.shrink import shrink

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 6, 6))
    hs = rng.normal(size=(6, 6))
    n = np.array([0.0, 5.0, 500.0])
    want = (n[:, None, None] * h + 7.0 * hs) / (n[:, None, None] + 7.0)
    got = shrink(mx.array(h, dtype=mx.float32), mx.array(n), mx.array(hs, dtype=mx.float32), 7.0)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)

    x = mx.array(rng.normal(size=(2, 40, 1, 1, 6)), dtype=mx.float32)
    idx = mx.array(rng.integers(0, 3, size=(2, 40, 2)), dtype=mx.int32)
    plain = PerExpertHessianCollector(6, 3)
    shared = PerExpertHessianCollector(6, 3, shared=True)
    shrunk = PerExpertHessianCollector(6, 3, shrinkage=7.0)
    for c in (plain, shared, shrunk):
        c.update(x[:1], idx[:1])
        c.update(x[1:], idx[1:])
    p, s, r = plain.stats(), shared.stats(), shrunk.stats()
    n_e = np.array(p.expert_tokens, dtype=np.float64)[:, None, None]
    want = (n_e * np.array(p.h) + 7.0 * np.array(s.h[0])) / (n_e + 7.0)
    np.testing.assert_allclose(np.array(r.h), want, rtol=1e-4, atol=1e-6)
    assert r.expert_tokens == p.expert_tokens


# -- the CLI: AWQ and learned rounding from a TOML recipe --------------------------------------

@pytest.mark.parametrize("processes", [1, 2])
def test_cli_quantize_runs_awq_and_learned_rounding_from_a_toml_recipe(stories_dir,
                                                                       tinystories_text,
                                                                       tmp_path, processes):
    """Also with two processes and a single calibration batch: the process without a batch
    takes part in every sum of the block methods."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlx_lm

    if processes > 1 and not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    repo = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[default]\nstrategy = "gptq"\nbits = 3\ngroup_size = 32\n\n'
                      '[[transform]]\nname = "awq"\nn_grid = 4\n\n'
                      '[[optimizer]]\nname = "learned_rounding"\nmethod = "scales"\nsteps = 4\n'
                      'eval_every = 2\n')
    out = tmp_path / "out"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run(
        [sys.executable, "-m", "quantkit.cli", "quantize", str(stories_dir), "-o", str(out),
         "--recipe", str(recipe), "--calibration", str(tinystories_text), "--num-samples", "4",
         "--seq-len", "64", "--quiet", "--processes", str(processes)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "quantization_report.json").read_text())
    n_blocks = json.loads((stories_dir / "config.json").read_text())["num_hidden_layers"]
    ran = [(m["kind"], m["name"]) for m in report["block_methods"]]
    assert ran.count(("transform", "awq")) == n_blocks
    assert ran.count(("optimizer", "learned_rounding")) == n_blocks
    awq = [m["figures"] for m in report["block_methods"] if m["name"] == "awq"]
    assert any(g["error"] <= g["error_unscaled"] for f in awq for g in f["groups"])
    tuned = [m["figures"] for m in report["block_methods"] if m["name"] == "learned_rounding"]
    assert all(f["loss_after"] <= f["loss_before"] for f in tuned)
    assert report["settings"]["recipe"]["transform"] == [{"name": "awq", "n_grid": 4}]
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt="Once upon a time", max_tokens=2),
                      str)


# -- cost controls: learned rounding on a few sequences a step, AWQ's search on a subset -------

def test_learned_rounding_in_small_steps_over_epochs_is_deterministic_and_never_worse():
    """The same seed gives the same bytes; another seed draws the sequences in another order."""
    runs = []
    for seed in (0, 0, 1):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        before = _block_loss(ctx, targets)
        figures = LearnedRounding(batch_size=1, epochs=5, eval_every=4,
                                  seed=seed).optimize(ctx, targets)
        assert figures["steps"] == 5 * 4  # 4 sequences in 2 batches, one a step, 5 passes
        after = _block_loss(ctx, targets)
        assert figures["loss_after"] == pytest.approx(after, rel=1e-3)
        assert after < before
        runs.append(_quantized_bytes(ctx.block))
    assert runs[0] == runs[1] and runs[2] != runs[0]


def test_step_width_scales_the_steps_of_wide_layers_only():
    """``step_width`` shrinks the steps of layers reading more inputs than it (here the down
    projection, 128 inputs, at width 64) and leaves narrower ones alone. One step, so every
    layer's gradient is taken at the same (the solve's) state in each run."""
    from quantkit.kernels.rounding import step_scale

    assert step_scale(576, 256) == pytest.approx(2 / 3) and step_scale(192, 256) == 1.0
    assert step_scale(4096, None) == 1.0
    runs = {}
    for width in (None, 128, 64):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        figures = LearnedRounding(steps=1, lr=0.05, eval_every=1,
                                  step_width=width).optimize(ctx, targets)
        assert figures["best_step"] == 1 and figures["loss_after"] < figures["loss_before"]
        assert figures["loss_after"] == pytest.approx(_block_loss(ctx, targets), rel=1e-3)
        runs[width] = _quantized_bytes(ctx.block)
    assert runs[128] == runs[None]  # no layer reads more than 128 inputs
    down = [k for k in runs[None] if ".down_proj." in k]
    others = [k for k in runs[None] if "_proj." in k and k not in down]
    assert down and others
    assert all(runs[64][k] == runs[None][k] for k in others)  # 64 inputs: the same step...
    assert any(runs[64][k] != runs[None][k] for k in down)  # ...128: a smaller one


def test_lr_scale_is_a_step_relative_to_the_number_of_steps():
    """``lr_scale`` (with ``lr`` unset) starts the steps at ``lr_scale / steps``: at 20 steps,
    0.5 gives the bytes ``lr = 1/40`` gives, and not those of the full step."""
    runs = {}
    for name, options in (("half", {"lr_scale": 0.5}), ("lr", {"lr": 1 / 40}), ("full", {})):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        figures = LearnedRounding(steps=20, eval_every=5, **options).optimize(ctx, targets)
        assert figures["loss_after"] < figures["loss_before"]
        runs[name] = _quantized_bytes(ctx.block)
    assert runs["half"] == runs["lr"] and runs["half"] != runs["full"]


def test_norm_step_tunes_the_blocks_norms_within_bounds_and_never_worse():
    """``norm_step`` tunes the block's norm weights with its layers: the stored objective is
    measured with them (never above the start), each weight moves by at most half of itself,
    runs are deterministic; without it the norms are the float block's."""
    runs = []
    for norm_step in (1.0, 1.0, 0.0):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        start = {n: np.array(getattr(ctx.block, n).weight)
                 for n in ("input_layernorm", "post_attention_layernorm")}
        figures = LearnedRounding(method="signround", steps=20, lr=0.05, eval_every=5,
                                  norm_step=norm_step).optimize(ctx, targets)
        assert figures["loss_after"] < figures["loss_before"]
        assert figures["loss_after"] == pytest.approx(_block_loss(ctx, targets), rel=1e-3)
        for n, w0 in start.items():
            w = np.array(getattr(ctx.block, n).weight)
            if norm_step:
                assert not np.array_equal(w, w0)
                assert np.all(np.abs(w / w0 - 1) <= 0.5 + 1e-2)  # (bfloat16 storage)
            else:
                assert np.array_equal(w, w0)
        runs.append((_quantized_bytes(ctx.block), figures["loss_after"]))
    assert runs[0] == runs[1] and runs[0][0] != runs[2][0]


def test_token_weighting_measures_each_positions_error_relative_to_its_size():
    """``weighting = "token"``: each output position's squared error divided by its target's
    mean square (float64 reference); the figures are that objective of the stored values, it
    never increases, and a block whose first position is 30x the others' is tuned differently
    from the plain mean squared error."""
    from quantkit.kernels.rounding import token_weights

    t = np.random.default_rng(0).normal(0, 2, (2, 5, 16))
    expect = 1 / np.mean(t.astype(np.float64) ** 2, axis=-1, keepdims=True)
    assert np.allclose(np.array(token_weights(mx.array(t.astype(np.float32)))), expect, rtol=1e-5)

    runs = {}
    for weighting in ("none", "token"):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2, first_scale=30.0)
        figures = LearnedRounding(method="signround", steps=20, lr=0.05, eval_every=5,
                                  weighting=weighting).optimize(ctx, targets)
        assert figures["loss_after"] < figures["loss_before"]
        outputs = [ctx.forward(ctx.block, j) for j in range(len(ctx.inputs))]
        d2 = np.concatenate([(np.array(o, np.float64) - np.array(t, np.float64)) ** 2
                             for o, t in zip(outputs, targets)])
        t2 = np.concatenate([np.array(t, np.float64) ** 2 for t in targets]).mean(-1, keepdims=True)
        stored = np.mean(d2 / t2) if weighting == "token" else np.mean(d2)
        assert figures["loss_after"] == pytest.approx(stored, rel=1e-3)
        runs[weighting] = _quantized_bytes(ctx.block)
    assert runs["none"] != runs["token"]


def test_rows_of_a_batch_cut_per_sequence_masks():
    """A step on some sequences of a batch computes what the whole batch computes for them,
    also with a per-sequence (padding) mask."""
    from quantkit.blocks.rounding import _chunks, _Rows

    assert _chunks([3, 2], 2) == [(0, slice(0, 2)), (0, slice(2, 3)), (1, slice(0, 2))]
    assert _chunks([3, 2], None) == [(0, slice(None)), (1, slice(None))]
    block = tiny_llama().model.layers[0]
    x = mx.random.normal((3, 8, 64), key=mx.random.key(2))
    keep = mx.array([[True] * 8, [True] * 5 + [False] * 3, [True] * 8])
    mask = mx.tril(mx.ones((8, 8), dtype=mx.bool_))[None, None] & keep[:, None, None, :]
    whole = block(x, mask, None)
    for rows in (slice(1, 3), slice(0, 1)):
        part = _Rows(block, rows, 3)(x, mask, None)
        assert np.allclose(np.array(part), np.array(whole[rows]), atol=1e-5)
    causal = _Rows(block, slice(1, 2), 3)(x, "causal", None)
    assert np.allclose(np.array(causal), np.array(block(x, "causal", None)[1:2]), atol=1e-5)


def test_awq_search_on_the_first_sequences():
    from quantkit.blocks.awq import _first_samples

    calls = [((mx.zeros((4, 8, 2)),), {}) for _ in range(3)]
    assert len(_first_samples(calls, 4)) == 1 and len(_first_samples(calls, 5)) == 2
    assert _first_samples(calls, None) == calls
    model = tiny_llama()
    tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
    ctx = block_context(model, LLAMA, tokens)
    figures = _check_float_function(ctx, ActivationAwareScaling(bits=3, group_size=32, n_grid=8,
                                                                search_samples=2))
    assert figures["groups"] and all(g["error"] <= g["error_unscaled"] for g in figures["groups"])
    # The unscaled error of each group is measured on the first batch (2 sequences) only.
    first = block_context(tiny_llama(), LLAMA, tokens[:2], batches=1)
    alone = ActivationAwareScaling(bits=3, group_size=32, n_grid=8, search_samples=None).apply(first)
    assert [g["error_unscaled"] for g in figures["groups"]] == \
        pytest.approx([g["error_unscaled"] for g in alone["groups"]], rel=1e-5)


# -- the output head and the float model's own activations as targets ------------------------

def test_kl_divergence_matches_float64():
    from quantkit.kernels.rounding import kl_divergence

    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 3, (2, 5, 40)), rng.normal(0, 3, (2, 5, 40))
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    got = np.array(kl_divergence(mx.array(p, dtype=mx.float32), mx.array(q, dtype=mx.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.array(kl_divergence(mx.array(p, dtype=mx.float32),
                                         mx.array(p, dtype=mx.float32))) < 1e-5)


def _head_arrays(model) -> list[np.ndarray]:
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    return [np.array(head[k]) for k in ("weight", "scales", "biases")]


@pytest.mark.parametrize("tied", [True, False])
def test_learned_rounding_tunes_the_head_against_the_float_model(tied):
    from quantkit import Recipe
    from quantkit.walker import ModelWalker

    def run(optimizer):
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=96,
            tie_word_embeddings=tied))
        model.set_dtype(mx.float32)
        tokens = mx.random.randint(0, 96, (6, 32), key=mx.random.key(1))
        events = []
        recipe = attrs.evolve(Recipe.uniform("gptq", bits=3, group_size=32), optimizers=(optimizer,))
        ModelWalker(recipe=recipe, batch_size=4,
                    progress=lambda e, info: events.append((e, info))).run(model, tokens)
        return model, [i for e, i in events if e == "optimizer"]

    base = LearnedRounding(method="signround", steps=12, eval_every=4)
    model, tuned = run(attrs.evolve(base, target="float_model", head=True))
    assert [t["block"] for t in tuned] == [0, 1, 2]  # the head is block 2, after the last one
    assert all(t["figures"]["loss_after"] <= t["figures"]["loss_before"] for t in tuned)
    assert tuned[-1]["figures"]["loss_after"] < tuned[-1]["figures"]["loss_before"]
    again, _ = run(attrs.evolve(base, target="float_model", head=True))
    for a, b in zip(_head_arrays(model), _head_arrays(again)):
        np.testing.assert_array_equal(a, b)  # deterministic
    plain, plain_tuned = run(base)
    assert len(plain_tuned) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(_head_arrays(model), _head_arrays(plain)))


@pytest.mark.parametrize("start", ["code", "float"])
def test_signround_starts_on_the_solves_codes(start):
    """Both starts reproduce the solve's codes (where its code is within one step of the float
    weight's position, as the offsets' range allows); ``"float"`` leaves a weight at its own
    position where the solve kept the nearest code, ``"code"`` puts it at its code's centre."""
    model = tiny_llama()
    tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
    ctx, _ = _quantized_block(model, LLAMA, tokens, bits=3)
    # The solve moved weights off their nearest codes, as GPTQ's error feedback does: the float
    # weights the offsets start from are not the ones the codes were rounded from.
    floats = {}
    for i, (path, m) in enumerate(ctx.float_layers.items()):
        moved = copy.copy(m)
        moved.weight = m.weight + 0.02 * mx.random.normal(m.weight.shape, key=mx.random.key(i))
        floats[path] = moved
    ctx = attrs.evolve(ctx, float_layers=floats)
    opt = LearnedRounding(method="signround", start=start)
    layers = opt._layers(ctx)
    assert layers
    moved_any = False
    for L in layers:
        v = np.array(opt._initial(L)["v"])
        u = np.array(L.u)
        nearest = np.clip(np.round(u), 0, 2**L.bits - 1)
        solve = np.array(_codes_of(L.module))
        near = np.abs(solve - u) <= 1.0
        assert np.all(np.abs(v) <= 0.5)
        assert np.array_equal(np.clip(np.round(u + v), 0, 2**L.bits - 1)[near], solve[near])
        moved_any |= bool(np.any(nearest != solve))
        inside = np.abs(u - solve) <= 0.4
        if start == "float":
            assert np.all(v[inside] == 0)
        else:
            assert np.allclose((u + v)[inside], solve[inside], atol=1e-5)
    assert moved_any


def _codes_of(m: nn.Module) -> mx.array:
    ones = mx.ones(m.scales.shape, mx.float32)
    return mx.dequantize(m.weight, ones, mx.zeros_like(ones), group_size=m.group_size,
                         bits=m.bits, mode="affine", dtype=mx.float32)
