"""Recipes: first match wins, inheritance from [default], TOML errors naming rule and key."""

from __future__ import annotations

import pytest

from quantkit import QuantSpec, Recipe, RecipeError

TOML = """
[default]
strategy = "gptq"
bits = 4
group_size = 64
damping = 0.02

[[rules]]
match = "model.layers.*.mlp.down_proj"
strategy = "rtn"
bits = 6

[[rules]]
match = "re:model\\\\.layers\\\\.[0-2]\\\\..*"
bits = 3

[[rules]]
match = "lm_head"
strategy = "skip"
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    return Recipe.from_toml(path)


def test_first_match_wins_and_inheritance(recipe):
    idx, rule = recipe.resolve("model.layers.1.mlp.down_proj")
    assert idx == 0 and rule.strategy == "rtn" and rule.spec == QuantSpec(6, 64)
    idx, rule = recipe.resolve("model.layers.1.self_attn.q_proj")
    assert idx == 1 and rule.strategy == "gptq" and rule.spec == QuantSpec(3, 64)
    assert dict(rule.options)["damping"] == 0.02  # same strategy: default options inherited
    assert rule.make_quantizer().damping == 0.02
    idx, rule = recipe.resolve("model.layers.11.self_attn.q_proj")  # regex is anchored
    assert idx is None and rule.spec == QuantSpec(4, 64)
    assert recipe.resolve("lm_head")[1].skip


def test_cli_flags_set_the_default_and_rules_follow(recipe):
    changed = recipe.with_default(bits=2, group_size=32)
    assert changed.resolve("model.layers.9.self_attn.q_proj")[1].spec == QuantSpec(2, 32)
    # rule 1 set bits itself (6) but inherited the group size
    assert changed.resolve("model.layers.9.mlp.down_proj")[1].spec == QuantSpec(6, 32)
    assert changed.resolve("model.layers.1.self_attn.q_proj")[1].spec == QuantSpec(3, 32)


@pytest.mark.parametrize("body,needle", [
    ('[default]\nbitz = 4\n', "[default]: unknown key 'bitz'"),
    ('[[rules]]\nmatch = "x"\nbits = 7\n', "rule 1 ('x'): key 'bits'"),
    ('[[rules]]\nmatch = "x"\ngroup_size = 48\n', "rule 1 ('x'): key 'group_size'"),
    ('[[rules]]\nmatch = "x"\nstrategy = "awq"\n', "rule 1 ('x'): unknown strategy 'awq'"),
    ('[[rules]]\nmatch = "re:model[("\n', "rule 1 ('re:model[('): key 'match' has an invalid regex"),
    ('[[rules]]\nmatch = "a"\n[[rules]]\nmatch = "b"\nstrategy = "rtn"\ndamping = 0.1\n',
     "rule 2 ('b'): unknown key 'damping'"),
    ('[[rules]]\nbits = 4\n', "rule 1: missing key 'match'"),
    ('[[rules]]\nmatch = "x"\nstrategy = "skip"\nbits = 4\n', "key 'bits' has no meaning"),
    ('[default]\ndamping = -1.0\n', "bad option value for strategy 'gptq'"),
    ('[defaults]\nbits = 4\n', "unknown top-level key 'defaults'"),
    ('[default\n', "is not valid TOML"),
])
def test_errors_name_the_rule_and_the_key(tmp_path, body, needle):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(RecipeError) as info:
        Recipe.from_toml(path)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_toml(tmp_path / "nope.toml")


def test_round_trip_through_dict(recipe):
    again = Recipe.from_dict(recipe.to_dict())
    for path in ["model.layers.1.mlp.down_proj", "model.layers.5.self_attn.k_proj", "lm_head"]:
        assert again.resolve(path) == recipe.resolve(path)


def test_embedding_table_sets_the_tied_embedding_s_damping(stories_dir, stories_tokens, tmp_path):
    """``[embedding] tied_damping`` solves the tied embedding / output head (stories260K ties
    them) with that GPTQ damping: the same arrays as a rule giving that layer the damping, other
    arrays than the recipe's own damping, every other layer unchanged; it reads back from
    TOML."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from quantkit import ModelWalker, load_model

    calib = stories_tokens[0][:8, :128]
    base = {"default": {"strategy": "gptq", "bits": 4, "group_size": 32}}
    recipes = {
        "plain": Recipe.from_dict(base),
        "table": Recipe.from_dict({**base, "embedding": {"tied_damping": 0.5}}),
        "rule": Recipe.from_dict({**base, "rules": [{"match": "model.embed_tokens", "damping": 0.5}]}),
    }
    (tmp_path / "r.toml").write_text(recipes["table"].to_toml())
    assert Recipe.from_toml(tmp_path / "r.toml") == recipes["table"]
    arrays = {}
    for name, recipe in recipes.items():
        model, _, _ = load_model(stories_dir)
        ModelWalker(recipe=recipe).run(model, calib)
        arrays[name] = {k: v for k, v in tree_flatten(model.parameters())}
    emb = "model.embed_tokens.weight"
    assert mx.array_equal(arrays["table"][emb], arrays["rule"][emb])
    assert not mx.array_equal(arrays["table"][emb], arrays["plain"][emb])
    for k, v in arrays["plain"].items():
        if not k.startswith("model.embed_tokens."):
            assert mx.array_equal(arrays["table"][k], v), k
