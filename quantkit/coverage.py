"""What a recipe does to a model before a long run: which layers each rule takes (first match
wins), which rules take none, and which strategies and block methods it uses (and which plugin
defines each). ``quantkit recipe check`` renders :func:`check_recipe`'s result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.nn as nn
from mlx.utils import tree_flatten

from .io import load_model
from .plugins import origin
from .recipe import Recipe
from .report import RunReport
from .strategies import STRATEGIES
from .validate import rule_warnings
from .walker import ModelWalker


@attrs.frozen
class RecipeCoverage:
    """``rules``: each rule's ``to_dict`` plus ``index`` (1-based) and, with a model, ``layers``
    (how many it takes); ``layers``: the model's layers in model order (``path``, ``rule``:
    1-based or ``None`` for the default, ``strategy``, ``bits``, ``group_size``, ``mode``,
    ``note``); ``warnings``: rules that match nothing or only layers earlier rules took;
    ``methods``: the strategies, transforms and optimizers used (``kind``, ``name``, ``class``,
    ``plugin``)."""

    rules: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    warnings: list[str]
    methods: list[dict[str, Any]]


def rule_label(index: int | None, rule: Any) -> str:
    return "default" if index is None else f"rule {index + 1} ({rule.match!r})"


def methods_used(recipe: Recipe) -> list[dict[str, Any]]:
    """The strategies (default first, then rules in order, each once; ``skip`` is none), block
    transforms and block optimizers ``recipe`` uses, with the plugin that defines each
    (``"built-in"`` for quantkit's own)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rule in (recipe.default, *recipe.rules):
        if rule.skip or rule.strategy in seen:
            continue
        seen.add(rule.strategy)
        out.append(_method("strategy", rule.strategy, STRATEGIES[rule.strategy]))
    for kind, methods in (("transform", recipe.transforms), ("optimizer", recipe.optimizers)):
        out += [_method(kind, type(m).name, type(m)) for m in methods]
    return out


def _method(kind: str, name: str, cls: type) -> dict[str, Any]:
    return {"kind": kind, "name": name, "class": f"{cls.__module__}.{cls.__qualname__}",
            "plugin": origin(cls)}


def check_recipe(recipe: Recipe, model_dir: str | Path | None = None) -> RecipeCoverage:
    """Which layers of ``model_dir`` (read lazily) each rule of ``recipe`` takes, with warnings
    for rules that take none; without a model, only the rules and methods."""
    rules = [{"index": i + 1, **rule.to_dict()} for i, rule in enumerate(recipe.rules)]
    layers: list[dict[str, Any]] = []
    warnings: list[str] = []
    if model_dir is not None:
        loaded, _, _ = load_model(model_dir, lazy=True)
        skipped = RunReport()
        plans = ModelWalker(recipe=recipe).plan(loaded, skipped)
        for p in plans.values():
            layers.append({"path": p.path, "rule": None if p.rule_index is None else p.rule_index + 1,
                           "strategy": p.rule.strategy, "bits": p.spec.bits,
                           "group_size": p.spec.group_size, "mode": p.spec.mode, "note": p.note})
        for r in skipped.layers:
            layers.append({"path": r.path, "rule": None if r.rule is None else r.rule + 1,
                           "strategy": "skip", "bits": None, "group_size": None, "mode": None,
                           "note": r.reason})
        order = {p: n for n, (p, _) in enumerate(
            tree_flatten(loaded.leaf_modules(), is_leaf=nn.Module.is_module))}
        layers.sort(key=lambda d: order.get(d["path"], len(order)))
        for i in range(len(recipe.rules)):
            rules[i]["layers"] = sum(1 for d in layers if d["rule"] == i + 1)
        # The same check `quantize` refuses a recipe by (quantkit.validate.check_rules).
        winners = {d["path"]: None if d["rule"] is None else d["rule"] - 1 for d in layers}
        warnings = [w for _, w in rule_warnings(recipe, winners)]
    return RecipeCoverage(rules=rules, layers=layers, warnings=warnings,
                          methods=methods_used(recipe))
