"""Block hooks: the recipe's transforms run on each block's float weights before its statistics
are collected, its optimizers after the solve with the float block's outputs as targets, and
the next block's inputs come from the (optimized) quantized block."""

from __future__ import annotations

import shutil
from typing import ClassVar

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from quantkit import Recipe, quantize_directory, quantize_model
from quantkit.blocks import BlockContext, BlockOptimizer, BlockTransform

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@attrs.frozen
class HookRecipe(Recipe):
    """A recipe carrying block methods (the fields the recipe grows elsewhere)."""

    transforms: tuple = ()
    optimizers: tuple = ()


def _module(block: nn.Module, path: str) -> nn.Module:
    return dict(block.named_modules())[path]


@attrs.frozen
class ScaleNorms(BlockTransform):
    """Scales each norm feeding linears (the architecture table's norm groups) by random
    per-channel factors and divides the linears' input columns by them: the same function."""

    name: ClassVar[str] = "test-scale-norms"
    log: list = attrs.field(factory=list, eq=False)
    #: each block's first input batch, read while the hook runs (a context's inputs are valid
    #: only then: on the CPU they are scratch files, removed when the block is done)
    first_inputs: dict = attrs.field(factory=dict, eq=False)

    def apply(self, ctx: BlockContext) -> dict:
        self.first_inputs[ctx.index] = np.array(ctx.inputs[0])
        before = ctx.forward(ctx.block, 0)
        groups = [g for g in ctx.arch.scale_groups if g.kind == "norm"]
        rng = np.random.default_rng(ctx.index)
        for g in groups:
            norm = _module(ctx.block, g.source)
            s = mx.array(rng.uniform(0.5, 2.0, norm.weight.shape).astype(np.float32))
            norm.weight = norm.weight * s
            for t in g.targets:
                lin = _module(ctx.block, t)
                lin.weight = lin.weight / s
        after = ctx.forward(ctx.block, 0)
        self.log.append(("transform", ctx, before, after))
        return {"groups": len(groups)}


@attrs.frozen
class DoubleDownScales(BlockOptimizer):
    """Checks what it is given; doubles block 0's down projection scales."""

    name: ClassVar[str] = "test-double-down"
    log: list = attrs.field(factory=list, eq=False)
    float_layers: dict = attrs.field(factory=dict, eq=False)  # their classes, by block

    def optimize(self, ctx: BlockContext, targets) -> dict:
        quantized = {k: _module(ctx.block, k) for k in LINEARS}
        # The targets: the float block's outputs on the block's inputs.
        ctx.block.update_modules(tree_unflatten(list(ctx.float_layers.items())))
        floats = [ctx.forward(ctx.block, j) for j in range(len(ctx.inputs))]
        ctx.block.update_modules(tree_unflatten(list(quantized.items())))
        if ctx.index == 0:
            down = _module(ctx.block, "mlp.down_proj")
            down.scales = down.scales * 2
        # (targets and float layers are valid while the method runs: on a CPU they are read
        # from scratch files removed once the block is done, so copies are logged)
        self.log.append(("optimizer", ctx, [np.array(t) for t in targets], floats, quantized,
                         ctx.forward(ctx.block, 0)))
        self.float_layers[ctx.index] = {k: type(m) for k, m in ctx.float_layers.items()}
        return {"batches": len(targets)}


def _tiny_llama(layers: int = 3) -> nn.Module:
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=layers, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
        tie_word_embeddings=False))
    mx.eval(model.parameters())
    return model


def test_hooks_run_in_order_per_block_with_the_right_inputs_and_targets():
    model = _tiny_llama(3)
    tokens = mx.random.randint(0, 512, (8, 32), key=mx.random.key(1))
    embedded = model.model.embed_tokens(tokens[:4])
    norm0 = np.array(model.model.layers[0].input_layernorm.weight)
    t, o = ScaleNorms(), DoubleDownScales()
    recipe = HookRecipe(default=Recipe.uniform("gptq", 4, 32).default, transforms=(t,), optimizers=(o,))
    events = []
    result = quantize_model(model, tokens, recipe, batch_size=4,
                            progress=lambda e, info: events.append((e, info.get("block"))))
    assert [e for e in events if e[0] in ("transform", "optimizer")] == [
        (kind, i) for i in range(3) for kind in ("transform", "optimizer")]
    assert [(m["block"], m["kind"], m["figures"]) for m in result.report.block_methods] == [
        (i, kind, fig) for i in range(3)
        for kind, fig in (("transform", {"groups": 2}), ("optimizer", {"batches": 2}))]

    logs = {(kind, c.index): rest for kind, c, *rest in t.log + o.log}
    contexts = {(kind, c.index): c for kind, c, *_ in t.log + o.log}
    for i in range(3):
        tctx = contexts["transform", i]
        assert tctx.float_layers == {} and tctx.arch.model_types[0] == "llama"
        assert len(tctx.inputs) == 2  # this process's batches
        before, after = logs["transform", i]
        np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-4, atol=1e-4)
        targets, floats, quantized, _ = logs["optimizer", i]
        assert sorted(o.float_layers[i]) == sorted(LINEARS)
        assert all(kind is nn.Linear for kind in o.float_layers[i].values())
        assert len(targets) == 2
        assert all(type(m) is nn.QuantizedLinear for m in quantized.values())  # not stand-ins
        for target, f in zip(targets, floats):
            np.testing.assert_allclose(np.array(target), np.array(f), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t.first_inputs[0], np.array(embedded))
    # Block 1's inputs: what the optimized quantized block 0 computes.
    optimized_out = logs["optimizer", 0][3]
    np.testing.assert_allclose(t.first_inputs[1], np.array(optimized_out), rtol=1e-3, atol=1e-3)
    # The transformed norm is what the model keeps.
    layer0 = model.model.layers[0]
    assert not np.allclose(np.array(layer0.input_layernorm.weight), norm0)
    assert dict(tree_flatten(layer0.parameters()))["mlp.down_proj.scales"].dtype == mx.float32


def test_output_with_hooks_loads_in_mlx_lm(tmp_path):
    from conftest import shared_path
    from mlx_lm import generate, load
    from mlx_lm.utils import save_config, save_model

    model = _tiny_llama(2)
    src = tmp_path / "m"
    save_model(src, model)
    save_config({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
                 "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "rms_norm_eps": 1e-5, "vocab_size": 512, "tie_word_embeddings": False},
                config_path=src / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(shared_path("models", "stories260K") / name, src / name)
    recipe = HookRecipe(default=Recipe.uniform("gptq", 4, 32).default,
                        transforms=(ScaleNorms(),), optimizers=(DoubleDownScales(),))
    out = quantize_directory(src, tmp_path / "q", recipe, num_samples=4, seq_len=32).out_dir
    loaded, tokenizer = load(str(out))
    assert type(loaded.model.layers[1].mlp.down_proj) is nn.QuantizedLinear
    assert isinstance(generate(loaded, tokenizer, "Once", max_tokens=3), str)
