"""Every expert calibrated (quantkit.experts): no starved expert, the router's outputs kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import shared_path, weight_bytes
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear

from quantkit import Recipe, load_model, quantize_model
from quantkit.calibration import make_batches, read_text, tokenize
from quantkit.experts import AllExpertsCalibration, with_all_experts
from quantkit.registry import DEFAULT_REGISTRY, SwitchLinearHandler

SWITCH = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def starved_moe(tmp_path_factory) -> Path:
    """stories260K-moe4 rebuilt with ``--starve``: expert 3's router row points away from the
    mean router input."""
    dense = shared_path("models", "stories260K-pad192")
    out = tmp_path_factory.mktemp("moe") / "moe4-starved"
    subprocess.run([sys.executable, str(dense.parent.parent / "tools" / "make_moe_fixture.py"),
                    str(dense), str(out), "--starve"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tokens(starved_moe, tinystories_text):
    _, tokenizer, _ = load_model(starved_moe)
    return make_batches(tokenize(tokenizer, read_text(tinystories_text)), 8, 128, seed=0)


def run(model_dir, tokens, registry):
    model, _, _ = load_model(model_dir)
    return quantize_model(model, tokens, Recipe.uniform("gptq", 4, 32), registry=registry).report


def test_starve_starves_and_all_experts_feeds_every_expert(starved_moe, tokens):
    n = tokens.size
    routed = run(starved_moe, tokens, DEFAULT_REGISTRY)
    starved = [r for r in routed.layers if r.expert is not None]
    # --starve works: expert 3 gets no TinyStories token in some layer, and falls back.
    assert starved and {r.expert for r in starved} == {3}
    assert any(r.n_tokens == 0 for r in starved)
    every = run(starved_moe, tokens, with_all_experts())
    assert [r for r in every.layers if r.status == "fallback" or r.expert is not None] == []
    experts = [r for r in every.layers if r.layer_class == "SwitchLinear"]
    assert len(experts) == 15
    for r in experts:  # 4 experts, top-2: every token once per expert; the router's 2 per token
        assert (r.n_tokens, r.routed_tokens) == (4 * n, 2 * n), r.path
    for r in (r for r in routed.layers if r.layer_class == "SwitchLinear" and r.expert is None):
        assert r.n_tokens == r.routed_tokens == 2 * n


def test_block_output_follows_the_router(starved_moe, tokens):
    """With the all-experts wrapper in place, the MoE block returns exactly what it returns
    without it, while each expert's collector sees every token."""
    model, _, _ = load_model(starved_moe)
    model.set_dtype(mx.float32)
    block = model.model.layers[0]
    x = model.model.embed_tokens(tokens[:4])
    expected = block(x, mask="causal")
    mx.eval(expected)
    handler = SwitchLinearHandler(expert_batch_size=2, calibrate_all_experts=True)
    moe = block.block_sparse_moe.switch_mlp
    originals = {name: moe[name] for name in SWITCH}
    collectors = {name: handler.collector(m, range(2, 4)) for name, m in originals.items()}
    moe.update_modules(tree_unflatten([(k, handler.catcher(originals[k], collectors[k]))
                                       for k in SWITCH]))
    block.block_sparse_moe.update_modules({"switch_mlp": AllExpertsCalibration(moe)})
    got = block(x, mask="causal")
    mx.eval(got, [c.arrays() for c in collectors.values()])
    assert mx.array_equal(got, expected).item()
    n = x.shape[0] * x.shape[1]
    gate = block.block_sparse_moe.gate(block.post_attention_layernorm(
        x + block.self_attn(block.input_layernorm(x), mask="causal")))
    top = np.asarray(mx.argpartition(-gate, kth=1, axis=-1)[..., :2]).reshape(-1)
    for c in collectors.values():
        stats = c.stats()
        assert stats.expert_tokens == (n, n)  # experts 2 and 3: every token
        assert stats.routed_rows == 2 * n
        assert np.array_equal(np.asarray(c.routed), np.bincount(top, minlength=4))


def test_two_processes_all_experts_and_a_mixture_write_the_same_bytes(
        starved_moe, tinystories_text, tmp_path):
    """``--processes 2`` forwards the repeated ``--calibration`` and the all-experts flag to
    the ranks, and the merged routed/all-experts counts give the same output as one process."""
    import json
    import os

    from quantkit.api import quantize_directory
    from quantkit.distributed import Distributed

    if not mx.distributed.is_available():
        pytest.skip("this MLX build has no distributed backend")
    shakespeare = shared_path("text", "tinyshakespeare.txt")
    mixture = [f"{tinystories_text}:0.5", f"{shakespeare}:0.5"]
    quantize_directory(starved_moe, tmp_path / "one", Recipe.uniform("gptq", 4, 32),
                       calibration=mixture, num_samples=8, seq_len=64,
                       distributed=Distributed(num_shards=2), registry=with_all_experts())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    args = ["--strategy", "gptq", "--bits", "4", "--group-size", "32", "--num-samples", "8", "--seq-len", "64",
            "--shards", "2", "--timeout", "60", "--quiet", "--moe-calibrate-all-experts",
            "--calibration", mixture[0], "--calibration", mixture[1], "--processes", "2"]
    two = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", str(starved_moe),
                          "-o", str(tmp_path / "two"), *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    assert weight_bytes(tmp_path / "one") == weight_bytes(tmp_path / "two")
    report = json.loads((tmp_path / "two" / "quantization_report.json").read_text())
    assert [s["samples"] for s in report["settings"]["calibration_data"]["sources"]] == [4, 4]
    experts = [r for r in report["layers"] if r["layer_class"] == "SwitchLinear"]
    assert experts and all(r["n_tokens"] == 2 * r["routed_tokens"] for r in experts)
    assert not [r for r in report["layers"] if r["expert"] is not None]


def test_all_experts_with_hessian_shrinkage_collector():
    """Both expert features in one collector: every expert's Hessian from every row it is sent
    (all experts), shrunk towards the Hessian over all rows by its row count, with the router's
    own counts kept beside."""
    from quantkit.hessian import PerExpertHessianCollector
    from quantkit.kernels.shrink import shrink

    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(size=(30, 1, 5)), dtype=mx.float32)
    every = mx.array(np.repeat(np.arange(3), 10), dtype=mx.int32)  # rows sent to experts 0..2
    both = PerExpertHessianCollector(5, 3, all_experts=True, shrinkage=4.0)
    plain = PerExpertHessianCollector(5, 3, all_experts=True)
    for c in (both, plain):
        c.update(x, every)
        c.count_routed(x[:6], mx.array([0, 0, 1, 2, 2, 2], dtype=mx.int32))
    got, base = both.stats(), plain.stats()
    rows = np.asarray(x).reshape(30, 5).astype(np.float64)
    h_all = rows.T @ rows / 30
    want = shrink(base.h, mx.array([10, 10, 10]), mx.array(h_all, dtype=mx.float32), 4.0)
    np.testing.assert_allclose(np.array(got.h), np.array(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.array(got.h), np.array(base.h))
    assert (got.n_tokens, got.routed_rows, got.expert_tokens) == (30, 6, (10, 10, 10))
    assert len(both.arrays()) == 4 and len(plain.arrays()) == 3


def test_all_experts_with_hessian_shrinkage_through_the_shard_merge(starved_moe, tokens):
    """The walk with both (two calibration shards, so '#routed' and '#all' go through the shard
    merge): every expert fed, the router's counts reported, and the shrinkage changes the
    experts' codes (it would not if the merge lost the all-rows Hessian: shrinking towards
    zeros only rescales each Hessian, and GPTQ's solution does not depend on its scale)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from quantkit.distributed import Distributed

    def walk(shrinkage):
        base = DEFAULT_REGISTRY.copy()
        base.register(SwitchLinear, SwitchLinearHandler(hessian_shrinkage=shrinkage))
        model, _, _ = load_model(starved_moe)
        report = quantize_model(model, tokens, Recipe.uniform("gptq", 4, 32),
                                registry=with_all_experts(base),
                                distributed=Distributed(num_shards=2)).report
        return model, report

    n = tokens.size
    shrunk, report = walk(16.0)
    plain, _ = walk(0.0)
    experts = [r for r in report.layers if r.layer_class == "SwitchLinear"]
    assert len(experts) == 15 and {r.status for r in experts} == {"quantized"}
    for r in experts:
        assert (r.n_tokens, r.routed_tokens) == (4 * n, 2 * n), r.path
    a = shrunk.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    b = plain.model.layers[0].block_sparse_moe.switch_mlp.down_proj
    assert not np.array_equal(np.array(a.weight), np.array(b.weight))


# -- the recipe's [moe] table ------------------------------------------------------------------

def _quantize_cli(model_dir, out, recipe, text, *extra):
    from typer.testing import CliRunner

    from quantkit.cli import app

    return CliRunner().invoke(app, [
        "quantize", str(model_dir), "-o", str(out), "--recipe", str(recipe), "--quiet",
        "--calibration", str(text), "--num-samples", "4", "--seq-len", "64", *extra])


def test_recipe_moe_table_equals_the_cli_flag(tinystories_text, tmp_path):
    """``[moe] calibrate_all_experts = true`` in a recipe file gives the bytes that
    ``--moe-calibrate-all-experts`` gives, with every expert fed every token; ``[moe]
    hessian_shrinkage`` the bytes of the handler option set in Python."""
    import json

    moe4 = shared_path("models", "stories260K-moe4")
    plain = tmp_path / "plain.toml"
    plain.write_text('[default]\nstrategy = "gptq"\nbits = 4\ngroup_size = 32\n')
    keyed = tmp_path / "keyed.toml"
    keyed.write_text(plain.read_text() + "\n[moe]\ncalibrate_all_experts = true\n")
    flag = _quantize_cli(moe4, tmp_path / "flag", plain, tinystories_text,
                         "--moe-calibrate-all-experts")
    assert flag.exit_code == 0, flag.output
    key = _quantize_cli(moe4, tmp_path / "key", keyed, tinystories_text)
    assert key.exit_code == 0, key.output
    routed = _quantize_cli(moe4, tmp_path / "routed", plain, tinystories_text)
    assert routed.exit_code == 0, routed.output
    assert weight_bytes(tmp_path / "key") == weight_bytes(tmp_path / "flag")
    assert weight_bytes(tmp_path / "key") != weight_bytes(tmp_path / "routed")
    report = json.loads((tmp_path / "key" / "quantization_report.json").read_text())
    experts = [r for r in report["layers"] if r["layer_class"] == "SwitchLinear"]
    assert experts and all(r["n_tokens"] == 2 * r["routed_tokens"] for r in experts)

    shrunk = tmp_path / "shrunk.toml"
    shrunk.write_text(plain.read_text() + "\n[moe]\nhessian_shrinkage = 16\n")
    assert _quantize_cli(moe4, tmp_path / "shrunk", shrunk, tinystories_text).exit_code == 0
    from quantkit.api import quantize_directory

    registry = DEFAULT_REGISTRY.copy()
    registry.register(SwitchLinear, SwitchLinearHandler(hessian_shrinkage=16.0))
    quantize_directory(moe4, tmp_path / "py", Recipe.from_toml(plain), calibration=tinystories_text,
                       num_samples=4, seq_len=64, registry=registry)
    assert weight_bytes(tmp_path / "shrunk") == weight_bytes(tmp_path / "py")
    assert weight_bytes(tmp_path / "shrunk") != weight_bytes(tmp_path / "routed")


@pytest.mark.parametrize("table, message", [
    ("calibrate_all_experts = \"yes\"", "key 'calibrate_all_experts' must be true or false, got 'yes'"),
    ("hessian_shrinkage = -1", "key 'hessian_shrinkage' must be a number ≥ 0"),
    ("calibrate_all = true", "unknown key 'calibrate_all'; allowed keys: ['calibrate_all_experts'"),
])
def test_recipe_moe_table_refuses_bad_values(stories_dir, tinystories_text, tmp_path, table,
                                             message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f"[default]\nbits = 4\n\n[moe]\n{table}\n")
    result = _quantize_cli(stories_dir, tmp_path / "o", recipe, tinystories_text)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.toml [moe]" in lines[0] and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_moe_table_round_trips():
    recipe = Recipe.from_dict({"default": {"bits": 3},
                               "moe": {"calibrate_all_experts": True, "hessian_shrinkage": 16}})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.with_default(bits=4).moe == recipe.moe
    handler = recipe.layer_registry().handler(SwitchLinear)
    assert (handler.calibrate_all_experts, handler.hessian_shrinkage) == (True, 16.0)
    assert Recipe().layer_registry() is DEFAULT_REGISTRY
