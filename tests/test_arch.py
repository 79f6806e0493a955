"""Every architecture table against the real mlx-lm module tree of its family.

For a tiny model of each family (built from mlx-lm's ``ModelArgs``, random weights): every path
of the table exists in some block and no block holds a group only in part; ``shared_inputs``
groups receive identical inputs (captured); and each ``ScaleGroup`` really feeds its targets —
scaling the source (a norm's effective weight ``weight + offset``, or a linear's rows and bias)
by ``s`` and the targets' input columns by ``1 / s`` leaves the block's output unchanged. That
last check is the contract an activation-aware scaling transform relies on.
"""

from __future__ import annotations

import copy
import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from quantkit.arch import (
    ARCHITECTURES,
    TABLES,
    ArchSpec,
    ScaleGroup,
    arch_for,
    arch_of,
    decoder_blocks,
    shared_input_groups,
)
from quantkit.errors import ModelLoadError
from quantkit.registry import Wrapper

_BASE = dict(rope_theta=1e4, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=64)

# (id, mlx-lm module, ModelArgs fields). Query and key/value heads are equal so that the
# v_proj → o_proj scalings apply (see ScaleGroup: widths must match).
FAMILIES = [
    ("llama", "llama", dict(model_type="llama", **_BASE)),
    ("mistral", "llama", dict(model_type="mistral", **_BASE)),
    ("qwen2", "qwen2", dict(model_type="qwen2", **_BASE)),
    ("qwen3", "qwen3", dict(model_type="qwen3", head_dim=8, max_position_embeddings=128,
                            tie_word_embeddings=True, **_BASE)),
    ("qwen3_moe", "qwen3_moe", dict(
        model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[], moe_intermediate_size=16,
        tie_word_embeddings=False, max_position_embeddings=128, norm_topk_prob=True, **_BASE)),
    ("mixtral", "mixtral", dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                **_BASE)),
    ("gemma3_text", "gemma3_text", dict(model_type="gemma3_text", head_dim=8,
                                        query_pre_attn_scalar=8, sliding_window=4,
                                        sliding_window_pattern=2, **_BASE)),
    ("gemma3", "gemma3", dict(model_type="gemma3", vocab_size=64, text_config=dict(
        model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        sliding_window_pattern=2, **{k: v for k, v in _BASE.items() if k != "vocab_size"}))),
    ("phi3", "phi3", dict(model_type="phi3", **_BASE)),
    ("deepseek_v3", "deepseek_v3", dict(
        model_type="deepseek_v3", moe_intermediate_size=16, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, **_BASE)),
    ("qwen2_moe", "qwen2_moe", dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                    **_BASE)),
    ("olmoe", "olmoe", dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, head_dim=8,
                            **_BASE)),
    ("glm4_moe", "glm4_moe", dict(
        model_type="glm4_moe", max_position_embeddings=128, moe_intermediate_size=16,
        norm_topk_prob=True, n_group=1, head_dim=8, topk_group=1, n_shared_experts=1,
        n_routed_experts=4, routed_scaling_factor=1.0, num_experts_per_tok=2,
        first_k_dense_replace=1, rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False,
        attention_bias=True, partial_rotary_factor=0.5, **_BASE)),
    ("deepseek_v3-no-q-lora", "deepseek_v3", dict(
        model_type="deepseek_v3", moe_intermediate_size=16, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, **_BASE)),
]
IDS = [f[0] for f in FAMILIES]
TOKENS = 40  # × 2 experts per token ≥ 64: SwitchGLU takes its sorted path


def _build(module: str, fields: dict) -> nn.Module:
    mod = importlib.import_module(f"mlx_lm.models.{module}")
    model = mod.Model(mod.ModelArgs.from_dict(fields))
    mx.random.seed(0)
    params = []
    for path, value in tree_flatten(model.parameters()):
        noise = mx.random.normal(value.shape) * 0.2
        params.append((path, (1.0 + noise) if value.ndim == 1 and "norm" in path else noise))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request):
    name, module, fields = request.param
    model = _build(module, fields)
    return name, model, arch_of(model, strict=True)


def _modules(block: nn.Module) -> dict[str, nn.Module]:
    return dict(block.named_modules())


def _x(seed: int = 1) -> mx.array:
    return mx.random.normal((1, TOKENS, _BASE["hidden_size"]), key=mx.random.key(seed))


def test_every_model_type_has_one_table_and_a_file():
    seen: dict[str, ArchSpec] = {}
    for spec in TABLES:
        for t in spec.model_types:
            assert t not in seen, f"{t} is in two tables"
            seen[t] = spec
    assert seen == ARCHITECTURES
    tested = {fields["model_type"] for _, _, fields in FAMILIES}
    assert set(ARCHITECTURES) - tested == {"joyai_llm_flash"}  # mlx-lm runs it as deepseek_v3


def test_unknown_model_type_is_one_line_naming_it():
    with pytest.raises(ModelLoadError, match=r"model_type 'mamba2' has no architecture table") as e:
        arch_for("mamba2")
    assert "\n" not in str(e.value) and "llama" in str(e.value)


def test_decoder_blocks_are_the_models_layers(family):
    name, model, spec = family
    blocks = decoder_blocks(model)
    assert blocks and all(a is b for a, b in zip(blocks, model.layers))
    assert len(blocks) == len(model.layers)


def test_table_paths_exist(family):
    name, model, spec = family
    found: set[str] = set()
    for i, block in enumerate(decoder_blocks(model)):
        present = set(_modules(block))
        # a scale group's source may serve another variant (a dense or a sparse MLP): its
        # targets decide whether it applies to this block. A group partly present must be
        # the other variant of a group wholly present (DeepSeek's q_proj / q_a_proj).
        groups = [*spec.shared_inputs, *(g.targets for g in spec.scale_groups)]
        whole = [g for g in groups if all(p in present for p in g)]
        for group in groups:
            there = [p for p in group if p in present]
            assert not there or len(there) == len(group) or any(
                set(there) <= set(w) for w in whole), (
                f"{name} block {i}: group {group} only partly present (missing "
                f"{sorted(set(group) - set(there))})")
            found.update(there)
        for g in spec.scale_groups:
            if g.targets[0] in present:
                assert g.source in present, f"{name} block {i}: {g.source} missing"
                found.add(g.source)
        for g in spec.scale_groups_in(present):
            assert g.scope is None or g.scope in present, f"{name}: scope {g.scope} missing"
            assert type(_modules(block)[g.source]).__name__.endswith(
                "RMSNorm" if g.kind == "norm" else "Linear")
    # every path is in some block of this family's models (variants: the other fixtures)
    variants = [f for f in FAMILIES if f[2]["model_type"] == name.split("-")[0]]
    if len(variants) == 1:
        assert spec.paths() <= found, f"{name}: table paths never found: {spec.paths() - found}"


def test_alternative_groups_cover_every_path():
    """DeepSeek lists q_a_proj and q_proj variants: together the two models use every path."""
    found: set[str] = set()
    for _, module, fields in FAMILIES:
        if fields["model_type"] != "deepseek_v3":
            continue
        for block in decoder_blocks(_build(module, fields)):
            found |= set(_modules(block))
    assert arch_for("deepseek_v3").paths() <= found


class _Capture(Wrapper):
    def __init__(self, module, seen: list) -> None:
        super().__init__(module)
        self.seen = seen

    def __call__(self, x, *args, **kwargs):
        self.seen.append(x)
        return self.module(x, *args, **kwargs)


def test_shared_inputs_receive_identical_inputs(family):
    name, model, spec = family
    checked = 0
    for i, block in enumerate(decoder_blocks(model)):
        block = copy.deepcopy(block)
        mods = _modules(block)
        groups = spec.shared_inputs_in(set(mods))
        seen: dict[str, list] = {p: [] for g in groups for p in g}
        block.update_modules(tree_unflatten([(p, _Capture(mods[p], seen[p])) for p in seen]))
        block(_x(), mask=None, cache=None)
        for g in groups:
            first = seen[g[0]]
            assert first, f"{name} block {i}: {g[0]} never called"
            for p in g[1:]:
                assert len(seen[p]) == len(first)
                for a, b in zip(first, seen[p]):
                    assert a.shape == b.shape and mx.array_equal(a, b).item(), (
                        f"{name} block {i}: {p} does not read {g[0]}'s input")
                checked += 1
    assert (checked > 0) == bool(spec.shared_inputs)


def test_shared_input_groups_maps_layers_to_their_group_leader(family):
    name, model, spec = family
    paths = [p for p, _ in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)]
    expected = {}
    for block in decoder_blocks(model):
        prefix = next(p for p, m in model.named_modules() if m is block) + "."
        for g in spec.shared_inputs_in(set(_modules(block))):
            expected.update({prefix + p: prefix + g[0] for p in g[1:]})
    assert shared_input_groups(model, paths) == expected
    assert bool(expected) == bool(spec.shared_inputs)
    # only among the paths given: without the leader, nothing maps to it
    leaders = set(expected.values())
    assert not set(shared_input_groups(model, [p for p in paths if p not in leaders]).values()) & leaders


def _scale(block: nn.Module, group: ScaleGroup, s: mx.array) -> None:
    """What an activation-aware scaling does: source × s, targets' input columns ÷ s."""
    mods = _modules(block)
    src = mods[group.source]
    if group.kind == "norm":
        src.weight = (src.weight + group.offset) * s - group.offset
    else:
        src.weight = src.weight * s[:, None]
        if "bias" in src:
            src.bias = src.bias * s
    for t in group.targets:
        mods[t].weight = mods[t].weight / s


def _scale_width(block: nn.Module, group: ScaleGroup) -> int:
    mods = _modules(block)
    src = mods[group.source].weight
    width = src.shape[0] if group.kind == "norm" else src.shape[-2]
    for t in group.targets:
        assert mods[t].weight.shape[-1] == width, f"{t} does not read {group.source}'s output"
    return width


def test_scale_groups_preserve_the_block_function(family):
    name, model, spec = family
    checked = 0
    x = _x()
    for i, block in enumerate(decoder_blocks(model)):
        ref = block(x, mask=None, cache=None)
        for group in spec.scale_groups_in(set(_modules(block))):
            scaled = copy.deepcopy(block)
            n = _scale_width(scaled, group)
            s = mx.random.uniform(0.25, 4.0, (n,), key=mx.random.key(checked + 7))
            _scale(scaled, group, s)
            out = scaled(x, mask=None, cache=None)
            np.testing.assert_allclose(np.array(out), np.array(ref), rtol=2e-4, atol=2e-4,
                                       err_msg=f"{name} block {i}: {group}")
            checked += 1
    assert checked >= 2


def test_scaling_without_the_router_changes_an_moe_block():
    """The contract test can fail: leave the router out of the MLP's norm group and the
    experts chosen, hence the block's output, change."""
    name, module, fields = next(f for f in FAMILIES if f[0] == "mixtral")
    model = _build(module, fields)
    block = decoder_blocks(model)[0]
    group = next(g for g in arch_for("mixtral").scale_groups if "block_sparse_moe.gate" in g.targets)
    broken = ScaleGroup(group.source, tuple(t for t in group.targets if not t.endswith(".gate")))
    x = _x()
    ref = block(x, mask=None, cache=None)
    scaled = copy.deepcopy(block)
    _scale(scaled, broken, mx.random.uniform(0.1, 10.0, (_BASE["hidden_size"],),
                                              key=mx.random.key(3)))
    out = scaled(x, mask=None, cache=None)
    assert not np.allclose(np.array(out), np.array(ref), rtol=2e-4, atol=2e-4)


def test_row_wise_modules_compute_each_row_from_its_own_row(family):
    """A ``row_wise`` module's output rows are the same whichever other rows it is given:
    rows computed alone (a slice of the input) agree with those computed together."""
    name, model, spec = family
    checked = 0
    for i, block in enumerate(decoder_blocks(model)):
        mods = _modules(block)
        for path in spec.row_wise:
            if path not in mods:
                continue
            x = _x().reshape(-1, _BASE["hidden_size"])
            whole = mods[path](x)
            half = x.shape[0] // 2
            parts = mx.concatenate([mods[path](x[:half]), mods[path](x[half:])])
            assert mx.allclose(parts, whole, rtol=1e-5, atol=1e-6).item(), f"{name} block {i}: {path}"
            checked += 1
    assert (checked > 0) == bool(spec.row_wise)
