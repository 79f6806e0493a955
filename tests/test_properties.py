"""Property-based tests (hypothesis): the recipe parser and the bit packer."""

from __future__ import annotations

import fnmatch
import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quantkit import QuantkitError, Recipe, RecipeError
from quantkit.kernels import affine_params, affine_quantize, pack_bits, unpack_bits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WIDTHS = [1, 2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]

# -- recipes ------------------------------------------------------------------------------------

PARTS = ["model", "layers", "0", "1", "12", "mlp", "self_attn", "q_proj", "k_proj", "down_proj",
         "up_proj", "lm_head", "embed_tokens"]
paths = st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map(".".join)
globs = st.lists(st.sampled_from([*PARTS, "*", "?", "[0-9]", "*_proj"]), min_size=1,
                 max_size=5).map(".".join)
regexes = st.lists(st.sampled_from([r"model", r"layers", r"\d+", r".*", r"(q|k)_proj", r"mlp"]),
                   min_size=1, max_size=4).map(lambda xs: "re:" + r"\.".join(xs))

spec_keys = st.fixed_dictionaries({}, optional={"bits": st.sampled_from(WIDTHS),
                                               "group_size": st.sampled_from(GROUPS)})
gptq_options = st.fixed_dictionaries({}, optional={
    "damping": st.floats(0.0, 1.0, allow_nan=False).map(lambda x: round(x, 6)),
    "block_size": st.sampled_from([32, 64, 128]),
    "max_attempts": st.integers(1, 6),
})


@st.composite
def rule_dicts(draw, default: bool = False):
    strategy = draw(st.sampled_from(["gptq", "rtn"] if default else ["gptq", "rtn", "skip"]))
    d = {} if default else {"match": draw(st.one_of(globs, regexes))}
    if draw(st.booleans()) or strategy == "skip":
        d["strategy"] = strategy
    if strategy != "skip":
        d.update(draw(spec_keys))
        if strategy == "gptq" and d.get("strategy") == "gptq":
            d.update(draw(gptq_options))
    return d


recipes = st.fixed_dictionaries({"default": rule_dicts(default=True),
                                 "rules": st.lists(rule_dicts(), max_size=5)})


def _toml(raw: dict) -> str:
    """A tiny TOML writer for recipe dicts (strings, ints, floats)."""
    def table(d):
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
    text = "[default]\n" + table(raw["default"])
    for rule in raw["rules"]:
        text += "\n[[rules]]\n" + table(rule)
    return text


@FAST
@given(recipes, st.lists(paths, min_size=1, max_size=8))
def test_recipe_round_trips(raw, sample_paths):
    recipe = Recipe.from_dict(raw)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert Recipe.from_dict(tomllib.loads(_toml(raw))) == recipe
    for path in sample_paths:
        assert again.resolve(path) == recipe.resolve(path)


@FAST
@given(st.lists(globs, min_size=1, max_size=6), paths)
def test_first_matching_rule_wins(patterns, path):
    recipe = Recipe.from_dict({"rules": [{"match": p, "bits": 2 + i % 3} for i, p in enumerate(patterns)]})
    expected = next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(path, p)), None)
    index, rule = recipe.resolve(path)
    assert index == expected
    assert rule is (recipe.default if expected is None else recipe.rules[expected])


@FAST
@given(recipes, st.sampled_from(WIDTHS))
def test_rules_inherit_the_default_unless_they_set_it(raw, bits):
    recipe = Recipe.from_dict(raw).with_default(bits=bits)
    for rule, own in zip(recipe.rules, raw["rules"], strict=True):
        if rule.strategy != "skip":
            assert rule.spec.bits == own.get("bits", bits)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["match", "strategy", "bits", "group_size", "mode", "damping",
                        "block_size", "max_attempts", "linalg", "rules", "default", "bogus"])
near_valid = st.dictionaries(keys, json_values | st.sampled_from(
    ["gptq", "rtn", "skip", "affine", "mxfp4", "re:(", "*", 4, 3, 64, 32, 0.01, "numpy"]), max_size=6)
junk = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"default": near_valid | json_values,
                                        "rules": st.lists(near_valid | json_values, max_size=3) | json_values}),
)


@settings(max_examples=300, deadline=None)
@given(junk)
def test_bad_recipes_raise_recipe_errors_only(raw):
    try:
        Recipe.from_dict(raw)
    except RecipeError:
        pass


@FAST
@given(recipes, near_valid)
def test_with_default_raises_recipe_errors_only(raw, settings_):
    recipe = Recipe.from_dict(raw)
    settings_.pop("match", None)
    settings_ = {k: v for k, v in settings_.items() if k not in ("rules", "default")}
    try:
        recipe.with_default(**settings_)
    except QuantkitError:
        pass


# -- the packer ----------------------------------------------------------------------------------

@FAST
@given(st.sampled_from(WIDTHS), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, rows, words32, seed):
    n = 32 * words32  # any multiple of 32 codes fills whole words at every width
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, n), dtype=np.uint8)
    packed = pack_bits(mx.array(codes), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (rows, n * bits // 32)
    assert np.array_equal(np.array(unpack_bits(packed, bits)), codes)


@st.composite
def weights(draw):
    group_size = draw(st.sampled_from(GROUPS))
    rows, groups = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 50.0]))
    w = rng.standard_normal((rows, groups * group_size)).astype(np.float32) * scale
    kind = draw(st.sampled_from(["normal", "constant_group", "zero_group", "one_sided", "outlier"]))
    g = w[:, :group_size]
    if kind == "constant_group":
        g[:] = g[:, :1]
    elif kind == "zero_group":
        g[:] = 0.0
    elif kind == "one_sided":
        w[:] = np.abs(w)
    elif kind == "outlier":
        w[0, rng.integers(w.shape[1])] = 100.0 * scale
    return w, group_size


@FAST
@given(weights(), st.sampled_from(WIDTHS))
def test_packer_matches_mx_quantize(wg, bits):
    w, group_size = wg
    x = mx.array(w)
    s, b = affine_params(x, bits, group_size)
    codes = affine_quantize(x, s, b, bits)
    # MLX's reference implementation, on any device (see test_packing's docstring)
    ref_w, ref_s, ref_b = mx.quantize(x, group_size=group_size, bits=bits, stream=mx.cpu)
    assume(bool(mx.all(mx.isfinite(ref_s)).item()))
    assert mx.array_equal(s, ref_s) and mx.array_equal(b, ref_b)
    assert mx.array_equal(pack_bits(codes, bits), ref_w)
    assert mx.array_equal(unpack_bits(ref_w, bits), codes)


def test_pack_rejects_partial_words():
    with pytest.raises(ValueError):
        pack_bits(mx.zeros((2, 10), dtype=mx.uint8), 3)
