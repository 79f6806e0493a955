"""Recipes: ordered rules mapping module paths to a strategy and its settings.

The first rule whose pattern matches a module path wins; paths no rule matches take the
``default``. A rule inherits ``bits``, ``group_size`` and ``mode`` from the default when it does
not set them, and the default's strategy options when it names the same strategy. Patterns are
globs on the dotted path (``model.layers.*.mlp.down_proj``) or regexes written ``re:<regex>``
(matched against the whole path).

A recipe may also name ``plugins`` (modules or ``.py`` files registering more strategies and
block methods, loaded before the rest is validated) and whole-block methods run around each
decoder block's solve: ``[[transform]]`` / ``[[optimizer]]`` tables, each a registered ``name``
plus that class's options, in the order they run. A ``[moe]`` table sets the options of the
mixture-of-experts layer handler (:class:`~quantkit.registry.SwitchLinearHandler`), e.g.
``calibrate_all_experts`` and ``hessian_shrinkage``; an ``[embedding]`` table those of the
embedding handler (:class:`~quantkit.registry.EmbeddingHandler`): ``tied_damping``. A
``[distill]`` table asks for end-to-end distillation after the walk
(:class:`~quantkit.pipeline.distill.Distillation`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .blocks.base import OPTIMIZERS, TRANSFORMS, BlockOptimizer, BlockTransform
from .errors import PluginError, RecipeError, SpecError, describe
from .pipeline.distill import Distillation
from .plugins import load_plugins
from .quantizers import Quantizer, check_options_class, strategy_options
from .registry import DEFAULT_REGISTRY, EmbeddingHandler, LayerRegistry, SwitchLinearHandler
from .specs import QuantSpec
from .strategies import STRATEGIES
from .validate import check_input_file

SKIP = "skip"
SPEC_KEYS = ("bits", "group_size", "mode")
RULE_KEYS = ("match", "strategy", *SPEC_KEYS)
#: Top-level keys of a recipe table (``transform`` / ``optimizer``: arrays of tables).
TOP_KEYS = ("plugins", "default", "rules", "transform", "optimizer", "moe", "embedding",
            "distill")


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_share(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def _is_nonnegative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v


def _is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


#: ``[moe]`` keys: options of :class:`~quantkit.registry.SwitchLinearHandler` → (check, what
#: a valid value is).
MOE_KEYS: dict[str, tuple[Any, str]] = {
    "calibrate_all_experts": (_is_bool, "true or false"),
    "hessian_shrinkage": (_is_nonnegative, "a number ≥ 0 (0: off)"),
    "expert_batch_size": (_is_positive_int, "an integer ≥ 1"),
    "min_token_share": (_is_share, "a number in [0, 1]"),
    "shared_hessian": (_is_bool, "true or false"),
}


#: ``[embedding]`` keys: options of :class:`~quantkit.registry.EmbeddingHandler`.
EMBEDDING_KEYS: dict[str, tuple[Any, str]] = {
    "tied_damping": (_is_nonnegative, "a number ≥ 0"),
}


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


@attrs.frozen
class Rule:
    """One recipe line: ``match`` → ``strategy`` with ``spec`` and strategy ``options``."""

    match: str
    strategy: str = "gptq"
    spec: QuantSpec = QuantSpec()
    options: tuple[tuple[str, Any], ...] = ()
    _regex: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_regex", _compile(self.match))

    def matches(self, path: str) -> bool:
        return self._regex.fullmatch(path) is not None

    @property
    def skip(self) -> bool:
        return self.strategy == SKIP

    def make_quantizer(self) -> Quantizer:
        return STRATEGIES[self.strategy](**dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.match, "strategy": self.strategy}
        if not self.skip:
            d.update(attrs.asdict(self.spec))
            d.update(dict(self.options))
        return d


@attrs.frozen
class Recipe:
    """Ordered rules plus a default; compile it with :meth:`resolve` per module path."""

    default: Rule = Rule("*")
    rules: tuple[Rule, ...] = ()

    def resolve(self, path: str) -> tuple[int | None, Rule]:
        """``(index of the first matching rule or None for the default, rule)``."""
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                return i, rule
        return None, self.default

    def with_default(self, **settings: Any) -> Recipe:
        """A copy whose default takes ``settings`` (``strategy``, ``bits``, ``group_size``,
        ``mode`` or strategy options); rules that inherited a value inherit the new one."""
        raw = self.to_dict()
        raw["default"].update({k: v for k, v in settings.items() if v is not None})
        return Recipe.from_dict(raw, _inherited=self._inherited)

    # Which keys each rule set itself (the rest were inherited): kept so that
    # ``with_default`` can re-derive inherited values.
    _inherited: tuple[tuple[str, ...], ...] = attrs.field(default=(), repr=False, eq=False)
    #: Plugins loaded for this recipe (module names; files as absolute paths).
    plugins: tuple[str, ...] = ()
    #: Block transforms, run in this order on each decoder block before its layers are solved.
    transforms: tuple[BlockTransform, ...] = ()
    #: Block optimizers, run in this order on each decoder block after its layers are solved.
    optimizers: tuple[BlockOptimizer, ...] = ()
    #: ``[moe]``: the options of the mixture-of-experts layer handler this recipe sets, as
    #: sorted ``(key, value)`` pairs (see :data:`MOE_KEYS` and :meth:`layer_registry`).
    moe: tuple[tuple[str, Any], ...] = ()
    #: ``[embedding]``: the options of the embedding handler this recipe sets (see
    #: :data:`EMBEDDING_KEYS`), as sorted ``(key, value)`` pairs.
    embedding: tuple[tuple[str, Any], ...] = ()
    #: ``[distill]``: the end-to-end distillation run after the walk
    #: (:mod:`quantkit.pipeline.distill`); ``None``: none.
    distill: Distillation | None = None

    def layer_registry(self, base: LayerRegistry = DEFAULT_REGISTRY) -> LayerRegistry:
        """``base``, or a copy whose ``SwitchLinear`` and ``Embedding`` handlers take the
        ``[moe]`` and ``[embedding]`` options."""
        if not self.moe and not self.embedding:
            return base
        out = base.copy()
        for cls, make, options in ((SwitchLinear, SwitchLinearHandler, self.moe),
                                   (nn.Embedding, EmbeddingHandler, self.embedding)):
            if options:
                handler = base.handler(cls)
                if not isinstance(handler, make):
                    handler = make()
                out.register(cls, attrs.evolve(handler, **dict(options)))
        return out

    def with_moe(self, **options: Any) -> Recipe:
        """A copy whose ``[moe]`` table also sets ``options`` (validated as in a file)."""
        raw = self.to_dict()
        raw["moe"] = {**raw.get("moe", {}), **options}
        return Recipe.from_dict(raw, _inherited=self._inherited)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what :meth:`from_dict` reads back; the checkpoint's
        fingerprint). ``plugins``, ``transform`` and ``optimizer`` appear only when set."""
        default = self.default.to_dict()
        default.pop("match")
        rules = []
        for i, rule in enumerate(self.rules):
            d = rule.to_dict()
            own = self._inherited[i] if i < len(self._inherited) else tuple(d)
            rules.append({k: _listed(v) for k, v in d.items() if k in own})
        out: dict[str, Any] = {"default": {k: _listed(v) for k, v in default.items()},
                               "rules": rules}
        if self.plugins:
            out["plugins"] = list(self.plugins)
        if self.transforms:
            out["transform"] = [method_to_dict(t) for t in self.transforms]
        if self.optimizers:
            out["optimizer"] = [method_to_dict(o) for o in self.optimizers]
        if self.moe:
            out["moe"] = dict(self.moe)
        if self.embedding:
            out["embedding"] = dict(self.embedding)
        if self.distill is not None:
            out["distill"] = self.distill.to_dict()
        return out

    def to_toml(self, header: str = "") -> str:
        """The recipe as TOML that :meth:`from_toml` reads back to an equal recipe; ``header``
        lines are written first as comments."""
        raw = self.to_dict()
        lines = [f"# {line}".rstrip() for line in header.splitlines()]
        if "plugins" in raw:
            lines += [_toml_pair("plugins", raw["plugins"]), ""]
        lines += ["[default]", *(_toml_pair(k, v) for k, v in raw["default"].items())]
        for rule in raw["rules"]:
            lines += ["", "[[rules]]", *(_toml_pair(k, v) for k, v in rule.items())]
        for key in ("transform", "optimizer"):
            for method in raw.get(key, []):
                lines += ["", f"[[{key}]]", *(_toml_pair(k, v) for k, v in method.items())]
        for key in ("moe", "embedding", "distill"):
            if key in raw:
                lines += ["", f"[{key}]", *(_toml_pair(k, v) for k, v in raw[key].items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def uniform(cls, strategy: str = "gptq", bits: int = 4, group_size: int = 64,
                mode: str = "affine", **options: Any) -> Recipe:
        return cls.from_dict(
            {"default": {"strategy": strategy, "bits": bits, "group_size": group_size,
                         "mode": mode, **options}}
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        path = check_input_file(path, "recipe file", RecipeError, "pass a TOML file")
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist; check the path") from None
        except OSError as exc:
            raise RecipeError(f"cannot read recipe file {path} ({exc.strerror or exc}); pass a TOML file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not valid TOML ({exc}); fix the syntax") from None
        return cls.from_dict(raw, source=str(path), base=path.parent)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "recipe",
                  _inherited: tuple[tuple[str, ...], ...] | None = None,
                  base: str | Path | None = None) -> Recipe:
        """Validate ``raw`` (the TOML's tables). ``plugins`` are loaded first, relative file
        paths taken from ``base`` (the recipe file's folder) or the working directory."""
        if not isinstance(raw, Mapping):
            raise RecipeError(f"{source}: a recipe must be a table with [default] and [[rules]], got {type(raw).__name__}")
        unknown = set(raw) - set(TOP_KEYS)
        if unknown:
            raise RecipeError(
                f"{source}: unknown top-level key {sorted(unknown)[0]!r}; use plugins = [...], "
                "[default], [[rules]], [[transform]], [[optimizer]], [moe], [embedding] and [distill]"
            )
        plugins_raw = raw.get("plugins", [])
        if not isinstance(plugins_raw, list) or not all(isinstance(p, str) for p in plugins_raw):
            raise RecipeError(f"{source}: 'plugins' must be a list of module names or .py paths, "
                              f'e.g. plugins = ["my_methods", "plugins/mine.py"]')
        try:
            plugins = load_plugins(plugins_raw, base)
        except PluginError as exc:
            raise PluginError(f"{source}: {exc}") from None
        if not isinstance(raw.get("default", {}), Mapping):
            raise RecipeError(f"{source}: 'default' must be a table ([default])")
        default_raw = dict(raw.get("default", {}))
        if "match" in default_raw:
            raise RecipeError(f"{source} [default]: key 'match' is not allowed in [default]")
        default = _build_rule({"match": "*", **default_raw}, None, f"{source} [default]")
        rules_raw = raw.get("rules", [])
        if not isinstance(rules_raw, list):
            raise RecipeError(f"{source}: 'rules' must be an array of tables ([[rules]])")
        rules, owned = [], []
        for i, r in enumerate(rules_raw):
            where = f"{source} rule {i + 1}"
            if not isinstance(r, Mapping):
                raise RecipeError(f"{where}: must be a table with 'match' and settings")
            if "match" not in r:
                raise RecipeError(f"{where}: missing key 'match' (a glob or 're:<regex>')")
            own = _inherited[i] if _inherited is not None and i < len(_inherited) else tuple(r)
            merged = {k: v for k, v in r.items() if k in own}
            rules.append(_build_rule(merged, default, f"{where} ({r['match']!r})"))
            owned.append(tuple(merged))
        transforms = _build_methods(raw.get("transform", []), TRANSFORMS, "transform",
                                    "block transform", source)
        optimizers = _build_methods(raw.get("optimizer", []), OPTIMIZERS, "optimizer",
                                    "block optimizer", source)
        moe = _build_table(raw.get("moe", {}), MOE_KEYS, "moe", "expert-layer options, e.g. "
                           "calibrate_all_experts = true", source)
        embedding = _build_table(raw.get("embedding", {}), EMBEDDING_KEYS, "embedding",
                                 "embedding options, e.g. tied_damping = 0.1", source)
        distill = _build_distill(raw["distill"], source) if "distill" in raw else None
        return cls(default=default, rules=tuple(rules), inherited=tuple(owned), plugins=plugins,
                   transforms=transforms, optimizers=optimizers, moe=moe, embedding=embedding,
                   distill=distill)


def method_to_dict(method: Any) -> dict[str, Any]:
    """A block transform or optimizer as ``{"name": ..., option: value}``: the options that
    differ from their defaults (so that :meth:`Recipe.from_dict` rebuilds an equal object)."""
    out: dict[str, Any] = {"name": type(method).name}
    for f in attrs.fields(type(method)):
        if not f.init or not f.eq:  # state a method keeps (e.g. a log), not an option
            continue
        value = getattr(method, f.name)
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        if value != default:
            out[f.name] = _listed(value)
    return out


def _tupled(value: Any) -> Any:
    """TOML arrays as tuples (frozen classes hold tuples, not lists)."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


def _build_methods(raw: Any, table: Mapping[str, type], key: str, kind: str,
                   source: str) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise RecipeError(f"{source}: '{key}' must be an array of tables ([[{key}]])")
    out = []
    for i, entry in enumerate(raw):
        where = f"{source} {key} {i + 1}"
        known = sorted(table)
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{where}: must be a table with 'name' and options ([[{key}]])")
        name = entry.get("name")
        if not isinstance(name, str):
            raise RecipeError(f"{where}: missing key 'name' (the {kind} to run; one of {known})")
        if name not in table:
            raise RecipeError(f"{where}: unknown {kind} {name!r} (key 'name'); use one of "
                              f"{known} (or load the plugin defining it: plugins = [...])")
        cls = table[name]
        check_options_class(cls, kind, f"register_{key}")
        options = [f.name for f in attrs.fields(cls)]
        extra = sorted(set(entry) - {"name", *options})
        if extra:
            raise RecipeError(f"{where} ({name!r}): unknown key {extra[0]!r}; allowed keys: "
                              f"{sorted(['name', *options])}")
        try:
            out.append(cls(**{k: _tupled(v) for k, v in entry.items() if k != "name"}))
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{where} ({name!r}): bad option value ({describe(exc)})") from None
    return tuple(out)


#: Table keys whose numbers are kept as floats (an integer in TOML is read as one).
_FLOAT_KEYS = ("hessian_shrinkage", "min_token_share", "tied_damping")


def _build_table(raw: Any, keys: Mapping[str, tuple[Any, str]], name: str, what: str,
                 source: str) -> tuple[tuple[str, Any], ...]:
    """A handler's options table (``[moe]``, ``[embedding]``), validated against ``keys``."""
    where = f"{source} [{name}]"
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: '{name}' must be a table ([{name}]) of {what}")
    for key, value in raw.items():
        if key not in keys:
            raise RecipeError(f"{where}: unknown key {key!r}; allowed keys: {sorted(keys)}")
        check, wanted = keys[key]
        if not check(value):
            raise RecipeError(f"{where}: key {key!r} must be {wanted}, got {value!r}")
    return tuple(sorted((k, float(v) if k in _FLOAT_KEYS else v) for k, v in raw.items()))


def _build_distill(raw: Any, source: str) -> Distillation:
    """The ``[distill]`` table, validated (its keys: :class:`Distillation`'s options)."""
    keys = [f.name for f in attrs.fields(Distillation)]
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: 'distill' must be a table ([distill]) of options {keys}")
    for key in raw:
        if key not in keys:
            raise RecipeError(f"{source} [distill]: unknown key {key!r}; allowed keys: {keys}")
    try:
        return Distillation(**raw)
    except RecipeError as exc:
        raise RecipeError(f"{source} {exc}") from None


def _toml_pair(key: str, value: Any) -> str:
    return f"{key} = {_toml_value(key, value)}"


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    raise RecipeError(f"recipe key {key!r}: cannot write a {type(value).__name__} to TOML")


def _build_rule(raw: Mapping[str, Any], default: Rule | None, where: str) -> Rule:
    strategy = raw.get("strategy", default.strategy if default else "gptq")
    if not isinstance(strategy, str):
        raise RecipeError(f"{where}: key 'strategy' must be a string, got {strategy!r}")
    if strategy != SKIP and strategy not in STRATEGIES:
        known = sorted([*STRATEGIES, SKIP])
        raise RecipeError(f"{where}: unknown strategy {strategy!r} (key 'strategy'); use one of {known}")
    pattern = raw["match"]
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}: key 'match' must be a non-empty string")
    try:
        _compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{where}: key 'match' has an invalid regex ({exc})") from None
    if strategy == SKIP:
        extra = set(raw) - {"match", "strategy"}
        if extra:
            raise RecipeError(f"{where}: key {sorted(extra)[0]!r} has no meaning for strategy 'skip'")
        return Rule(match=pattern, strategy=SKIP)
    options = strategy_options(strategy)
    unsupported = sorted((set(raw) - set(RULE_KEYS)) & STRATEGIES[strategy].unsupported_options)
    if unsupported:
        raise RecipeError(f"{where}: strategy {strategy!r} does not support option "
                          f"{unsupported[0]!r}; its options: {sorted(options)}")
    unknown = set(raw) - set(RULE_KEYS) - set(options)
    if unknown:
        allowed = sorted({*RULE_KEYS, *options})
        raise RecipeError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed keys: {allowed}")
    base = default.spec if default is not None and not default.skip else QuantSpec()
    spec_kw = {k: raw.get(k, getattr(base, k)) for k in SPEC_KEYS}
    if not isinstance(spec_kw["mode"], str):
        raise RecipeError(f"{where}: key 'mode' must be a string, got {spec_kw['mode']!r}")
    for key in ("bits", "group_size"):
        if not isinstance(spec_kw[key], int) or isinstance(spec_kw[key], bool):
            raise RecipeError(f"{where}: key {key!r} must be an integer, got {spec_kw[key]!r}")
    try:
        spec = QuantSpec(**spec_kw)
    except SpecError as exc:
        key = "mode" if str(exc).startswith("mode") else str(exc).split("=")[0]
        raise RecipeError(f"{where}: key {key!r}: {exc}") from None
    inherited_opts = dict(default.options) if default is not None and default.strategy == strategy else {}
    opts = {**inherited_opts, **{k: _tupled(raw[k]) for k in options if k in raw}}
    rule = Rule(match=pattern, strategy=strategy, spec=spec, options=tuple(sorted(opts.items())))
    try:
        rule.make_quantizer()
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: bad option value for strategy {strategy!r} ({describe(exc)})") from None
    return rule
