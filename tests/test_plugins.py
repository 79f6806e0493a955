"""Name registries that refuse clashes, plugins from modules and files, and recipes carrying
block methods (``[[transform]]`` / ``[[optimizer]]``) with validated options."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs
import mlx.core as mx
import pytest
from typer.testing import CliRunner

from quantkit import plugins
from quantkit.blocks import OPTIMIZERS, TRANSFORMS, BlockTransform, register_transform
from quantkit.checkpoint import fingerprint
from quantkit.cli import app
from quantkit.errors import PluginError, RecipeError
from quantkit.gptaq import GPTAQQuantizer
from quantkit.quantizers import STRATEGIES, Quantizer, round_to_nearest
from quantkit.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin"


@pytest.fixture(autouse=True)
def registries():
    """Each test starts from, and leaves, the registries and loaded plugins as they were."""
    saved = [dict(t) for t in (STRATEGIES, TRANSFORMS, OPTIMIZERS, plugins.LOADED)]
    modules = set(sys.modules)
    yield
    for table, before in zip((STRATEGIES, TRANSFORMS, OPTIMIZERS, plugins.LOADED), saved):
        table.clear()
        table.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith("quantkit_plugin_") or name.startswith("qk_test_"):
            del sys.modules[name]


PLUGIN = '''
from typing import ClassVar
import attrs
from quantkit import Quantizer, register_strategy
from quantkit.blocks import BlockTransform, register_transform
from quantkit.quantizers import round_to_nearest


@register_strategy
@attrs.frozen
class Plain(Quantizer):
    name: ClassVar[str] = "{strategy}"
    needs_hessian: ClassVar[bool] = False
    levels: tuple[int, ...] = (1, 2)

    def quantize(self, weight, spec, stats=None, storage_dtype=None):
        return round_to_nearest(weight, spec, storage_dtype)


@register_transform
@attrs.frozen
class Nothing(BlockTransform):
    name: ClassVar[str] = "{transform}"
    strength: float = 0.5
    layers: tuple[str, ...] = ()

    def apply(self, ctx):
        return {{}}
'''


def _write_plugin(path: Path, strategy: str = "plain", transform: str = "nothing") -> Path:
    path.write_text(PLUGIN.format(strategy=strategy, transform=transform))
    return path


# -- registries ------------------------------------------------------------------------------


def test_register_strategy_refuses_a_taken_name_naming_both_classes():
    from quantkit.quantizers import register_strategy

    @attrs.frozen
    class Mine(Quantizer):
        name: ClassVar[str] = "gptq"

        def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
            return round_to_nearest(weight, spec, storage_dtype)

    with pytest.raises(RecipeError) as e:
        register_strategy(Mine)
    msg = str(e.value)
    assert "'gptq'" in msg and "Mine" in msg and "GPTQQuantizer" in msg and "\n" not in msg
    assert STRATEGIES["gptq"].__name__ == "GPTQQuantizer"  # not replaced


def test_custom_quantizer_without_attrs_frozen_is_told_so():
    from quantkit.quantizers import register_strategy

    class Bare(Quantizer):
        name: ClassVar[str] = "bare"

        def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
            return round_to_nearest(weight, spec, storage_dtype)

    with pytest.raises(RecipeError, match=r"not an attrs class: decorate it with @attrs.frozen"):
        register_strategy(Bare)
    with pytest.raises(RecipeError, match=r"mutable attrs class: use @attrs.frozen"):
        register_strategy(attrs.define(Bare))
    assert "bare" not in STRATEGIES


def test_register_transform_refuses_a_taken_name():
    @register_transform
    @attrs.frozen
    class First(BlockTransform):
        name: ClassVar[str] = "qk_test_first"

        def apply(self, ctx):
            return {}

    @attrs.frozen
    class Second(BlockTransform):
        name: ClassVar[str] = "qk_test_first"

        def apply(self, ctx):
            return {}

    with pytest.raises(RecipeError, match="already registered by .*First"):
        register_transform(Second)


# -- plugins ---------------------------------------------------------------------------------


def test_plugin_file_registers_its_names_once(tmp_path):
    path = _write_plugin(tmp_path / "mine.py")
    key = plugins.load_plugin(str(path))
    assert key == str(path) and "plain" in STRATEGIES and "nothing" in TRANSFORMS
    assert plugins.load_plugin(str(path)) == key  # loaded once: no clash with itself
    assert plugins.origin(STRATEGIES["plain"]) == str(path)
    assert plugins.origin(STRATEGIES["gptq"]) == "built-in"


def test_plugin_module_from_sys_path(tmp_path, monkeypatch):
    _write_plugin(tmp_path / "qk_test_mod.py", strategy="plain_mod", transform="nothing_mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_plugin("qk_test_mod") == "qk_test_mod"
    assert plugins.origin(STRATEGIES["plain_mod"]) == "qk_test_mod"


@pytest.mark.parametrize("body, expected", [
    (None, r"plugin file .*nowhere.py does not exist; check the path"),
    ("import not_a_module_anywhere\n", r"failed to import \(ModuleNotFoundError: .*line 1\)"),
    ("x = 1\ny = undefined_name\n", r"failed to import \(NameError: .*undefined_name.*line 2\)"),
    ("def broken(:\n", r"failed to import \(SyntaxError: .*line 1\)"),
])
def test_plugin_errors_are_one_line(tmp_path, body, expected):
    path = tmp_path / "nowhere.py"
    if body is not None:
        path.write_text(body)
    with pytest.raises(PluginError, match=expected) as e:
        plugins.load_plugin(str(path))
    assert "\n" not in str(e.value)


def test_missing_plugin_module_is_one_line():
    with pytest.raises(PluginError, match=r"plugin module 'qk_test_absent' cannot be imported"):
        plugins.load_plugin("qk_test_absent")
    with pytest.raises(PluginError, match="neither a module name nor a .py file"):
        plugins.load_plugin("not a module")


def test_a_clashing_plugin_is_refused_and_its_partial_names_undone(tmp_path):
    path = _write_plugin(tmp_path / "clash.py", strategy="qk_test_new", transform="nothing")
    _write_plugin(tmp_path / "first.py")  # registers "nothing" first
    plugins.load_plugin(str(tmp_path / "first.py"))
    with pytest.raises(PluginError, match=r"plugin .*clash.py: block transform name 'nothing' "
                                          r"is already registered"):
        plugins.load_plugin(str(path))
    assert "qk_test_new" not in STRATEGIES  # registered before the clash, then undone


# -- recipes with plugins and block methods --------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_recipe_loads_plugins_relative_to_itself_and_round_trips(tmp_path):
    _write_plugin(tmp_path / "mine.py")
    path = _recipe(tmp_path, """
        plugins = ["mine.py"]
        [default]
        strategy = "plain"
        levels = [3, 4, 5]
        [[transform]]
        name = "nothing"
        layers = ["q", "k"]
        [[transform]]
        name = "nothing"
        strength = 0.25
    """)
    recipe = Recipe.from_toml(path)
    assert recipe.plugins == (str(tmp_path / "mine.py"),)
    assert recipe.default.make_quantizer().levels == (3, 4, 5)  # a TOML list: a tuple
    assert [t.layers for t in recipe.transforms] == [("q", "k"), ()]
    assert recipe.transforms[1].strength == 0.25
    back = tmp_path / "back.toml"
    back.write_text(recipe.to_toml())
    again = Recipe.from_toml(back)
    assert again == recipe and again.to_dict() == recipe.to_dict()
    assert recipe.to_dict()["transform"] == [{"name": "nothing", "layers": ["q", "k"]},
                                             {"name": "nothing", "strength": 0.25}]
    # with_default keeps the plugins and the block methods
    assert recipe.with_default(bits=3).transforms == recipe.transforms


def test_plain_recipes_keep_their_dict(tmp_path):
    """No plugins or block methods: to_dict (the checkpoint fingerprint, the report) is as
    before."""
    assert set(Recipe().to_dict()) == {"default", "rules"}


def test_a_mixed_precision_plan_keeps_plugins_and_block_methods(tmp_path):
    from quantkit.mixed import _plan_recipe
    from quantkit.specs import QuantSpec

    _write_plugin(tmp_path / "mine.py")
    base = Recipe.from_dict({"plugins": [str(tmp_path / "mine.py")],
                             "default": {"strategy": "plain", "levels": [7]},
                             "transform": [{"name": "nothing", "strength": 1.0}]})
    planned = _plan_recipe(base, ["a.q_proj", "a.k_proj"],
                           {"a.q_proj": QuantSpec(bits=3), "a.k_proj": QuantSpec(bits=3)})
    assert planned.plugins == base.plugins and planned.transforms == base.transforms
    assert planned.default.make_quantizer().levels == (7,) and planned.default.spec.bits == 3
    assert Recipe.from_dict(planned.to_dict()) == planned


def test_block_methods_change_the_checkpoint_fingerprint(tmp_path):
    _write_plugin(tmp_path / "mine.py")
    (tmp_path / "config.json").write_text("{}")
    tokens = mx.zeros((1, 4), dtype=mx.int32)
    plain = Recipe.from_dict({"plugins": [str(tmp_path / "mine.py")]})
    with_t = Recipe.from_dict({"plugins": [str(tmp_path / "mine.py")], "transform": [{"name": "nothing"}]})
    a = fingerprint(tmp_path, tokens, recipe=plain.to_dict())
    b = fingerprint(tmp_path, tokens, recipe=with_t.to_dict())
    assert a != b and json.dumps(b)


@pytest.mark.parametrize("text, expected", [
    ('[[transform]]\nname = "awq_typo"\n',
     r"recipe.toml transform 1: unknown block transform 'awq_typo' \(key 'name'\); use one of \["),
    ('[[transform]]\nname = "nothing"\nstrenght = 1.0\n',
     r"transform 1 \('nothing'\): unknown key 'strenght'; allowed keys: \['layers', 'name', 'strength'\]"),
    ('[[optimizer]]\nsteps = 3\n', r"optimizer 1: missing key 'name'"),
    ('[[optimizer]]\nname = "x"\n',
     r"optimizer 1: unknown block optimizer 'x'"),
    ('transform = "nothing"\n', r"'transform' must be an array of tables \(\[\[transform\]\]\)"),
    ('plugins = "mine.py"\n', r"'plugins' must be a list"),
    ('[stuff]\n', r"unknown top-level key 'stuff'"),
    ('[default]\nstrategy = "gptaq"\nact_order = true\n',
     r"\[default\]: strategy 'gptaq' does not support option 'act_order'; its options: \["),
    ('[[rules]]\nmatch = "*"\nstrategy = "gptaq"\ncompute = "mlx"\n',
     r"rule 1 \('\*'\): strategy 'gptaq' does not support option 'compute'"),
])
def test_recipe_errors_name_the_table_and_key(tmp_path, text, expected):
    _write_plugin(tmp_path / "mine.py")
    path = _recipe(tmp_path, 'plugins = ["mine.py"]\n' + text if "plugins" not in text else text)
    with pytest.raises(RecipeError, match=expected) as e:
        Recipe.from_toml(path)
    assert "\n" not in str(e.value)


def test_unsupported_options_are_refused_in_python_too():
    assert GPTAQQuantizer(alpha=0.5).alpha == 0.5
    for option, value in [("act_order", True), ("static_groups", True), ("scale_search", "mse"),
                          ("compute", "numpy")]:
        with pytest.raises(RecipeError, match=f"does not support option '{option}'"):
            GPTAQQuantizer(**{option: value})


def test_a_non_attrs_transform_is_told_to_use_attrs_frozen(tmp_path):
    class Loose(BlockTransform):
        name: ClassVar[str] = "qk_test_loose"

        def apply(self, ctx):
            return {}

    register_transform(Loose)
    with pytest.raises(RecipeError, match=r"block transform class .*Loose is not an attrs class: "
                                          r"decorate it with @attrs.frozen \(below @register_transform\)"):
        Recipe.from_dict({"transform": [{"name": "qk_test_loose"}]})


# -- CLI -------------------------------------------------------------------------------------


runner = CliRunner()


def test_cli_strategy_is_checked_against_the_registry(tmp_path, stories_dir):
    res = runner.invoke(app, ["quantize", str(stories_dir), "-o", str(tmp_path / "o"),
                              "--strategy", "plain"])
    assert res.exit_code == 2
    assert "unknown strategy 'plain' (--strategy); known: gptaq, gptq, rtn" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_plugin_errors_are_one_line(tmp_path):
    recipe = _recipe(tmp_path, "[default]\nbits = 4\n")
    res = runner.invoke(app, ["recipe", "check", str(recipe), "--plugin", str(tmp_path / "gone.py")])
    assert res.exit_code == 1
    assert "gone.py does not exist" in res.output and "Traceback" not in res.output


def test_cli_recipe_check_lists_methods_and_their_plugins(tmp_path):
    path = _write_plugin(tmp_path / "mine.py")
    recipe = _recipe(tmp_path, """
        [default]
        strategy = "plain"
        [[rules]]
        match = "*.mlp.*"
        strategy = "rtn"
        [[transform]]
        name = "nothing"
    """)
    res = runner.invoke(app, ["recipe", "check", str(recipe), "--plugin", str(path), "--json"])
    assert res.exit_code == 0, res.output
    methods = json.loads(res.stdout)["methods"]
    assert [(m["kind"], m["name"], m["plugin"]) for m in methods] == [
        ("strategy", "plain", str(path)), ("strategy", "rtn", "built-in"),
        ("transform", "nothing", str(path))]


def test_every_rank_gets_every_plugin(tmp_path):
    """--processes N restarts this command once per rank: each must load the same plugins."""
    import typer

    from quantkit.cli import _rank_argv

    quantize = typer.main.get_command(app).commands["quantize"]
    ctx = quantize.make_context("quantize", ["m", "-o", str(tmp_path / "o"), "--plugin", "a.py",
                                             "--plugin", "pkg.mod", "--strategy", "plain",
                                             "--processes", "2"])
    argv = _rank_argv(ctx, 1, quiet=False)
    i = argv.index("--plugin")
    assert argv[i:i + 4] == ["--plugin", "a.py", "--plugin", "pkg.mod"]
    assert argv[argv.index("--strategy") + 1] == "plain" and "--processes" not in argv
