"""The pipeline's seams: a :class:`WalkHook` sees every planned layer and each dense layer with
its statistics just before the solve; :func:`solve_matrix` is the one fallback/measure/pack
step of dense and expert layers; :mod:`quantkit.pipeline.build` makes the quantized layers."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from quantkit import GPTQQuantizer, Recipe, RTNQuantizer
from quantkit.hessian import HessianStats
from quantkit.pipeline import build
from quantkit.pipeline.hooks import WalkHook
from quantkit.pipeline.solve import solve_matrix
from quantkit.specs import QuantSpec
from quantkit.walker import ModelWalker


def _tiny_llama(layers: int = 2) -> nn.Module:
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
        tie_word_embeddings=False))
    mx.eval(model.parameters())
    return model


@attrs.define
class Recorder(WalkHook):
    planned_paths: list = attrs.field(factory=list)
    solved: list = attrs.field(factory=list)

    def planned(self, plans):
        self.planned_paths.append(sorted(plans))

    def before_solve(self, plan, stats):
        self.solved.append((plan.path, None if stats is None else stats.n_tokens,
                            type(plan.module)))


def test_a_walk_hook_sees_every_planned_layer_and_its_statistics_before_the_solve():
    model = _tiny_llama(2)
    tokens = mx.random.randint(0, 256, (4, 16), key=mx.random.key(1))
    hook = Recorder()
    result = ModelWalker(recipe=Recipe.uniform("gptq", 4, 32), batch_size=2,
                         hooks=[hook]).run(model, tokens)
    quantized = [r for r in result.report.layers if r.status != "skipped"]
    assert hook.planned_paths == [sorted(r.path for r in quantized)]
    assert sorted(p for p, _, _ in hook.solved) == sorted(r.path for r in quantized)
    # the statistics it is shown are the ones the layer is solved with
    tokens_seen = {p: n for p, n, _ in hook.solved}
    assert {r.path: r.n_tokens for r in quantized} == tokens_seen
    assert sum(n == 4 * 16 for n in tokens_seen.values()) == 2 * 7 + 1  # linears, lm_head
    # it sees the float layer, before it is replaced
    assert {kind for _, _, kind in hook.solved} == {nn.Linear, nn.Embedding}
    assert {type(m) for p, m in model.named_modules() if p in tokens_seen} == \
        {nn.QuantizedLinear, nn.QuantizedEmbedding}


def _stats(n_in: int, seed: int = 0) -> HessianStats:
    x = np.random.default_rng(seed).standard_normal((512, n_in)).astype(np.float32)
    return HessianStats(h=mx.array(x.T @ x / len(x)), n_tokens=len(x))


def test_solve_matrix_gives_the_same_bytes_chunked_or_whole_and_measures_with_the_hessian():
    """The dense path (a slice of rows at a time) and the expert path (one piece) store the
    same arrays and the same error figures for one matrix."""
    w = mx.array(np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32))
    spec, stats = QuantSpec(bits=4, group_size=32), _stats(64)
    gptq = GPTQQuantizer(chunk_mb=0.01)  # several slices of rows
    chunked = solve_matrix(w, spec, mx.float32, quantizer=gptq, stats=stats,
                           fallback=RTNQuantizer(), measure=stats)
    whole = solve_matrix(w, spec, mx.float32, quantizer=gptq, stats=stats,
                         fallback=RTNQuantizer(), measure=stats, chunked=False)
    for k in ("weight", "scales", "biases"):
        assert mx.array_equal(chunked.packed[k], whole.packed[k]), k
    assert not chunked.fell_back and chunked.strategy is gptq
    e, energy, rtn = chunked.figures
    assert np.allclose(chunked.figures, whole.figures, rtol=1e-5)
    # the error figure is trace(D H Dᵀ) of the stored layer (float64 reference)
    deq = mx.dequantize(chunked.packed["weight"], chunked.packed["scales"],
                        chunked.packed["biases"], group_size=32, bits=4)
    d = np.asarray(w, np.float64) - np.asarray(deq, np.float64)
    h = np.asarray(stats.h, np.float64)
    assert e == pytest.approx(np.trace(d @ h @ d.T), rel=1e-4)
    assert 0 < e < rtn < energy


def test_solve_matrix_falls_back_when_refused_or_the_factor_failed():
    from quantkit.errors import FactorizationError

    w = mx.array(np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32))
    spec, stats = QuantSpec(bits=4, group_size=32), _stats(64)
    rtn = RTNQuantizer()
    refused = solve_matrix(w, spec, mx.float32, quantizer=GPTQQuantizer(), stats=None,
                           fallback=rtn, refused="no calibration activations reached this layer")
    assert refused.fell_back and refused.strategy is rtn and refused.figures is None
    assert refused.reason == "no calibration activations reached this layer"
    failed = solve_matrix(w, spec, mx.float32, quantizer=GPTQQuantizer(), stats=stats,
                          fallback=rtn, measure=stats, factor=FactorizationError("not positive definite"), chunked=False)
    assert failed.fell_back and failed.reason == "not positive definite"
    plain = rtn.quantize(w, spec, None, mx.float32)
    assert mx.array_equal(failed.packed["weight"],
                          build.pack(plain, spec, mx.float32)["weight"])
    assert failed.figures is not None and failed.figures[0] == failed.figures[2]  # it is RTN


def test_build_makes_the_layer_from_packed_arrays_and_reads_it_back_from_a_file(tmp_path):
    model = _tiny_llama(1)
    walker = ModelWalker(recipe=Recipe.uniform("rtn", 4, 32))
    plan = walker.plan(model)["model.layers.0.mlp.down_proj"]
    w = plan.module.weight
    packed = build.pack(RTNQuantizer().quantize(w, plan.spec, None, mx.float32), plan.spec,
                        plan.storage_dtype)
    layer = build.build(plan, packed)
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (4, 32)
    ref_w, ref_s, ref_b = mx.quantize(w, group_size=32, bits=4)
    assert mx.array_equal(layer.weight, ref_w) and mx.array_equal(layer.scales, ref_s)
    again = build.from_parameters(plan, tree_flatten(layer.parameters()))
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in
               zip(tree_flatten(again.parameters()), tree_flatten(layer.parameters()), strict=True))
    mx.save_safetensors(str(tmp_path / "block.safetensors"),
                        {f"{plan.path}.{k}": v for k, v in tree_flatten(layer.parameters())})
    [(path, read)] = build.from_file([plan], tmp_path / "block.safetensors")
    assert path == plan.path and mx.array_equal(read.weight, layer.weight)
