"""``quantkit recipe check``: a recipe's rules, the layers each matches and the methods it uses
(:func:`quantkit.coverage.check_recipe`), rendered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import QuantkitError
from .app import PLUGIN_HELP, app, err, fail, fmt, load_plugin_args, out, wide

recipe_app = typer.Typer(no_args_is_help=True, help="Validate a recipe and see which layers its rules match.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("check")
def recipe_check(
    file: Annotated[Path, typer.Argument(help="recipe TOML file")],
    model: Annotated[Optional[Path], typer.Option(help="model directory: show which layers each rule matches")] = None,
    plugin: Annotated[Optional[list[str]], typer.Option(metavar="MODULE_OR_FILE", help=PLUGIN_HELP)] = None,
    strict: Annotated[bool, typer.Option(help="exit with code 4 when a rule matches no layer")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only warnings and errors")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print rules, layers, methods and warnings as JSON")] = False,
) -> None:
    """Validate a recipe FILE; with --model, show which layers each rule matches.

    Rules that match no layer, or only layers an earlier rule already took, are warned about.
    Lists the strategies, block transforms and optimizers the recipe uses, and their plugins."""
    from ..coverage import check_recipe
    from ..recipe import Recipe

    try:
        load_plugin_args(plugin)
        recipe = Recipe.from_toml(file)
        checked = check_recipe(recipe, model)
    except QuantkitError as exc:
        fail(str(exc))
        return
    rules, layers, warnings = checked.rules, checked.layers, checked.warnings
    if json_out:
        out.print_json(json.dumps({"recipe": str(file), "default": recipe.to_dict()["default"],
                                   "rules": rules, "layers": layers, "methods": checked.methods,
                                   "warnings": warnings}))
    elif not quiet:
        table = Table(title=f"{file}: rules in order (the first match wins)", box=box.SIMPLE_HEAD)
        for col in ("#", "match", "strategy", "bits", "group", "mode", "options"):
            table.add_column(col, no_wrap=col != "options")
        if model is not None:
            table.add_column("layers", justify="right")
        n_default = sum(1 for d in layers if d["rule"] is None)
        everything = [("default", recipe.default, n_default)] + [
            (str(i + 1), r, rules[i].get("layers", 0)) for i, r in enumerate(recipe.rules)]
        for label, rule, count in everything:
            d = rule.to_dict()
            opts = ", ".join(f"{k}={v}" for k, v in rule.options)
            cells = [label, escape("*" if label == "default" else rule.match), rule.strategy,
                     fmt(d.get("bits"), "d"), fmt(d.get("group_size"), "d"),
                     str(d.get("mode", "-")), escape(opts)]
            if model is not None:
                cells.append(str(count) if count else "[yellow]0[/]")
            table.add_row(*cells)
        wide().print(table)
        mt = Table(title="methods the recipe uses", box=box.SIMPLE_HEAD)
        for col in ("kind", "name", "class", "plugin"):
            mt.add_column(col, no_wrap=col != "plugin")
        for m in checked.methods:
            mt.add_row(m["kind"], escape(m["name"]), escape(m["class"]), escape(m["plugin"]))
        wide().print(mt)
        if layers:
            lt = Table(title=f"layers of {model}", box=box.SIMPLE_HEAD)
            for col in ("layer", "rule", "strategy", "bits", "group", "mode", "note"):
                lt.add_column(col, no_wrap=col != "note")
            for d in layers:
                lt.add_row(escape(d["path"]), "default" if d["rule"] is None else str(d["rule"]),
                           d["strategy"] if d["bits"] is not None else "[yellow]full precision[/]",
                           fmt(d["bits"], "d"), fmt(d["group_size"], "d"), str(d["mode"] or "-"),
                           escape(d["note"] or ""))
            wide().print(lt)
        err.print(f"[bold green]ok[/] {escape(str(file))}: {len(recipe.rules)} rule(s)"
                  + (f", {len(layers)} layers planned" if model is not None else
                     "; pass --model DIR to see which layers each rule matches"), highlight=False, soft_wrap=True)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if strict and warnings:
        raise typer.Exit(4)
