"""``quantkit inspect``: a quantized directory's settings per layer
(:func:`quantkit.inspection.quantized_layers`) as a table or JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..errors import QuantkitError
from .app import app, fail, out


@app.command()
def inspect(
    model_dir: Annotated[str, typer.Argument(help="quantized model directory, or a Hugging Face repo id (org/name)")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """List each layer's quantization settings as mlx_lm.load will apply them."""
    from ..hub import resolve_model
    from ..inspection import quantized_layers

    try:
        model_path = resolve_model(model_dir)
        found = quantized_layers(model_path)
    except QuantkitError as exc:
        fail(str(exc))
        return
    default, rows = found.default, found.layers
    if json_out:
        out.print_json(json.dumps({"default": default, "layers": rows}))
        return
    table = Table(title=f"{model_path}  (default: {default})")
    for col in ("layer", "bits", "group", "mode"):
        table.add_column(col)
    for r in rows:
        if r["quantized"]:
            table.add_row(r["path"], str(r["bits"]), str(r["group_size"]), r["mode"])
        else:
            table.add_row(r["path"], "-", "-", "[yellow]full precision[/]")
    out.print(table)
