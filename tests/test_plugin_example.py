"""examples/plugin/ end to end through the real CLI on stories260K: the plugin's strategy,
block transform and block optimizer are used from a TOML recipe, once loaded by the recipe's
``plugins = [...]`` and once by ``--plugin``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin"
PLUGIN = EXAMPLE / "my_methods.py"
CUSTOM = {("strategy", "shrink_rtn"), ("transform", "balance_columns"), ("optimizer", "block_error")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """The example recipe as written (``plugins = [...]``), and a copy without that line in
    another folder, used with ``--plugin``."""
    text = (EXAMPLE / "recipe.toml").read_text()
    assert 'plugins = ["my_methods.py"]' in text
    bare = tmp_path_factory.mktemp("bare") / "recipe.toml"
    bare.write_text(text.replace('plugins = ["my_methods.py"]', ""))
    return {"plugins": (EXAMPLE / "recipe.toml", []),
            "--plugin": (bare, ["--plugin", str(PLUGIN.relative_to(REPO))])}


@pytest.fixture(scope="module")
def reports(recipes, stories_dir, tinystories_text, tmp_path_factory) -> dict[str, dict]:
    out = {}
    for how, (recipe, extra) in recipes.items():
        target = tmp_path_factory.mktemp("q") / "out"
        res = _cli("quantize", str(stories_dir), "-o", str(target), "--recipe", str(recipe),
                   *extra, "--calibration", str(tinystories_text), "--num-samples", "8",
                   "--seq-len", "64", "--quiet")
        assert res.returncode == 0, res.stderr[-3000:]
        out[how] = json.loads((target / "quantization_report.json").read_text())
    return out


@pytest.mark.parametrize("how", ["plugins", "--plugin"])
def test_recipe_check_lists_the_plugins_methods(how, recipes, stories_dir):
    recipe, extra = recipes[how]
    res = _cli("recipe", "check", str(recipe), "--model", str(stories_dir), *extra, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout)
    methods = {(m["kind"], m["name"]): m["plugin"] for m in found["methods"]}
    assert CUSTOM <= set(methods)
    assert {methods[k] for k in CUSTOM} == {str(PLUGIN)}
    assert methods[("strategy", "gptq")] == "built-in"
    mlp = [d for d in found["layers"] if ".mlp." in d["path"] and d["bits"] is not None]
    assert mlp and {d["strategy"] for d in mlp} == {"shrink_rtn"}
    # the table view names them too
    table = _cli("recipe", "check", str(recipe), *extra)
    assert table.returncode == 0 and all(name in table.stdout for _, name in CUSTOM)


@pytest.mark.parametrize("how", ["plugins", "--plugin"])
def test_quantize_uses_the_plugins_strategy(how, reports):
    layers = reports[how]["layers"]
    by_strategy = {r["path"]: r["strategy"] for r in layers if r["status"] == "quantized"}
    mlp = {p: s for p, s in by_strategy.items() if ".mlp." in p}
    assert mlp and set(mlp.values()) == {"shrink_rtn"}
    assert {s for p, s in by_strategy.items() if ".mlp." not in p} == {"gptq"}
    recipe = reports[how]["settings"]["recipe"]
    assert recipe["rules"][0]["ratios"] == [1.0, 0.95, 0.9, 0.85]  # a TOML list option
    assert recipe["transform"] == [{"name": "balance_columns"}]


@pytest.mark.parametrize("how", ["plugins", "--plugin"])
def test_quantize_runs_the_plugins_block_methods(how, reports):
    """The walk calls each block's transforms and optimizers and records them in the report
    (anywhere but ``settings``, which only repeats the recipe)."""
    ran = json.dumps({k: v for k, v in reports[how].items() if k != "settings"})
    assert "balance_columns" in ran and "block_error" in ran


def test_the_example_transform_keeps_the_block_function_and_evens_columns():
    """BalanceColumns.apply on a tiny llama block (what the pipeline will call): the block's
    output is unchanged and the linears' input columns after each norm are more even."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import llama

    from quantkit.arch import arch_for
    from quantkit.blocks import TRANSFORMS, BlockContext
    from quantkit.plugins import load_plugin

    load_plugin(str(PLUGIN))
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1,
                                        intermediate_size=128, num_attention_heads=4,
                                        rms_norm_eps=1e-5, vocab_size=32))
    block = model.layers[0]
    mx.random.seed(1)
    q = block.self_attn.q_proj
    q.weight = q.weight * mx.random.uniform(0.1, 10.0, (64,))  # uneven input columns
    x = [mx.random.normal((2, 16, 64))]

    def spread(m) -> float:
        cols = np.abs(np.array(m.weight)).max(axis=0)
        return float(cols.max() / cols.min())

    before, ref = spread(q), block(x[0], mask=None, cache=None)
    ctx = BlockContext(index=0, path="model.layers.0", block=block, inputs=x,
                       forward=lambda module, j: module(x[j], mask=None, cache=None),
                       arch=arch_for("llama"))
    figures = TRANSFORMS["balance_columns"](strength=0.5).apply(ctx)
    assert figures == {"groups": 2}
    np.testing.assert_allclose(np.array(block(x[0], mask=None, cache=None)), np.array(ref),
                               rtol=1e-4, atol=1e-5)
    assert spread(q) < before / 2
