"""``quantkit report``: the per-layer table of a run report (``quantization_report.json``) and
its plot (:mod:`quantkit.plotting`)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import QuantkitError
from .app import app, err, fail, fmt, out, wide


class SortBy(str, Enum):
    depth = "depth"
    error = "error"
    kl = "kl"


def _read_report(path: Path):
    from ..report import read_report

    try:
        return read_report(path)
    except QuantkitError as exc:
        fail(str(exc))


@app.command()
def report(
    out_dir: Annotated[Path, typer.Argument(help="directory written by `quantkit quantize`")],
    png: Annotated[Optional[Path], typer.Option(help="write a plot of error by layer and depth to this PNG file")] = None,
    top: Annotated[int, typer.Option(help="how many of the worst layers to highlight")] = 5,
    sort: Annotated[SortBy, typer.Option(help="row order: depth, error (relative output error) or kl (contribution to the output KL, where measured)")] = SortBy.depth,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing (with --png: only write the plot)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the layers and a summary as JSON")] = False,
) -> None:
    """Per-layer error table of a quantize run (and a PNG plot), worst layers highlighted."""
    import attrs

    from ..plotting import plot_report
    from ..report import layer_depth, ordered_layers, summarize, worst_by_output_kl, worst_layers

    run = _read_report(out_dir)
    worst = worst_layers(run, top)
    with_kl = [r for r in run.layers if r.output_kl is not None]
    worst_kl = worst_by_output_kl(run, top)
    if png is not None:
        try:
            plot_report(run, png, top=top, title=str(out_dir))
        except QuantkitError as exc:
            fail(str(exc))
    if quiet:
        return
    summary = {**summarize(run, top), "png": str(png) if png else None}
    if json_out:
        out.print_json(json.dumps({"summary": summary, "layers": [
            {**attrs.asdict(r), "depth": layer_depth(r)} for r in run.layers]}))
        return
    rows = ordered_layers(run, sort.value)
    worst_paths = {r.path for r in worst}
    table = Table(title=f"{out_dir}  ({fmt(run.bits_per_weight, '.3f')} bits per weight, "
                        f"{run.time_s:.1f} s)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("strategy", no_wrap=True)
    cols = ["bits", "group", "mode", "tokens", "damping", "H-error", "rel.err", "vs RTN", "time s"]
    if with_kl:
        cols.insert(-1, "out KL")
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r.status == "skipped":
            strategy = "[yellow]full prec.[/]"
        elif r.status == "fallback":
            strategy = f"[yellow]{r.strategy} (fallback)[/]"
        else:
            strategy = str(r.strategy)
        ratio = (r.hessian_error / r.rtn_hessian_error
                 if r.hessian_error is not None and r.rtn_hessian_error else None)
        style = "bold red" if r.path in worst_paths else None
        cells = [escape(r.path), strategy, fmt(r.bits, "d"), fmt(r.group_size, "d"),
                 r.mode or "-", fmt(r.n_tokens, "d"), fmt(r.damping, "g"), fmt(r.hessian_error),
                 fmt(r.relative_error, ".2e"), fmt(ratio, ".2f")]
        if with_kl:
            cells.append(fmt(r.output_kl, ".2e"))
        table.add_row(*cells, f"{r.time_s:.3f}", style=style)
    wide().print(table)
    if worst:
        out.print("worst layers by relative output error: " + ", ".join(
            f"{escape(r.path)} ({r.relative_error:.4f})" for r in worst), highlight=False, soft_wrap=True)
    if worst_kl:
        out.print("worst layers by their contribution to the output KL (nats per token, that layer "
                  "alone quantized): " + ", ".join(
                      f"{escape(r.path)} ({r.output_kl:.4f})" for r in worst_kl),
                  highlight=False, soft_wrap=True)
    for r in run.by_status("fallback"):
        out.print(f"[yellow]fell back to {r.strategy}[/] {escape(r.path)}: {escape(str(r.reason))}",
                  highlight=False, soft_wrap=True)
    for r in run.by_status("skipped"):
        out.print(f"[yellow]kept in full precision[/] {escape(r.path)}: {escape(str(r.reason))}",
                  highlight=False, soft_wrap=True)
    if png is not None:
        err.print(f"[bold green]wrote[/] {escape(str(png))}", highlight=False)
