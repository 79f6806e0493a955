"""``quantkit compare``: several quantized models against their float model on the same windows
(:func:`quantkit.compare.compare_models`), a table and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from .. import interrupt
from ..errors import QuantkitError
from .app import (
    BatchSizeOption,
    DebugOption,
    NumSamplesOption,
    SeedOption,
    SeqLenOption,
    TextOption,
    app,
    check_windows,
    err,
    fail,
    fmt,
    interrupted_line,
    out,
    progress_bar,
    reported,
    wide,
)
from .signals import force_exit


@app.command()
def compare(
    model_dirs: Annotated[list[str], typer.Argument(help="quantized model directories or Hugging Face repo ids (any number)")],
    reference: Annotated[str, typer.Option(help="the float model they were quantized from (a directory or a repo id)")],
    text: TextOption = None,
    png: Annotated[Optional[Path], typer.Option(help="write a plot of KL (log scale) against bits per weight to this PNG file")] = None,
    seq_len: SeqLenOption = 512,
    num_samples: NumSamplesOption = 64,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing (with --png: only write the plot)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
    debug: DebugOption = False,
) -> None:
    """Several quantized models against their float model on the same windows of a text: bits
    per weight, size, perplexity, KL(float ‖ model) mean and 99th percentile, top-1 agreement
    and the recipe of each; --png draws KL against bits per weight."""
    from ..compare import compare_models
    from ..plotting import plot_comparison

    check_windows(num_samples, seq_len, batch_size, seed, text)
    if png is not None:
        from ..validate import check_output_file

        try:
            check_output_file(png, "the plot", "pass a PNG file name")
        except QuantkitError as exc:
            fail(str(exc))
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (checked before the models run, not after)
        except ImportError:
            fail("drawing the plot needs matplotlib; install it with pip install 'quantkit[plot]'")
    start = time.perf_counter()
    bar = progress_bar(disable=quiet or json_out)
    tasks: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(escape(name), total=total)
        bar.update(tasks[name], completed=done)

    with reported(debug, lambda exc: f"{interrupted_line(exc)}; nothing was written"):
        with bar, interrupt.handling(force_exit):
            rows = compare_models(model_dirs, reference, text, num_samples=num_samples,
                                  seq_len=seq_len, seed=seed, batch_size=batch_size,
                                  progress=progress)
        if png is not None:
            plot_comparison([r.to_dict() for r in rows], png,
                            title=f"KL to {Path(reference).name} on {text.name if text else 'the built-in text'}")
    if quiet:
        return
    ref_ppl = rows[0].fidelity.reference_perplexity if rows else None
    if json_out:
        out.print_json(json.dumps({
            "reference": str(reference), "reference_perplexity": ref_ppl,
            "text": str(text or "builtin"), "num_samples": num_samples, "seq_len": seq_len,
            "models": [r.to_dict() for r in rows], "png": str(png) if png else None,
            "time_s": time.perf_counter() - start}))
        return
    source = text.name if text else "the built-in text"
    positions = rows[0].fidelity.positions if rows else 0
    out.print(f"against {escape(str(reference))} (perplexity {fmt(ref_ppl, '.4f')}) on {positions} "
              f"next-token positions of {escape(source)}", highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for col in ("bits/weight", "size MB", "perplexity", "KL mean", "KL p99", "top-1"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("recipe")
    for r in sorted(rows, key=lambda r: r.bits_per_weight):
        f = r.fidelity
        table.add_row(escape(r.model), f"{r.bits_per_weight:.3f}", f"{r.size_bytes / 1e6:.2f}",
                      f"{f.perplexity:.4f}", f"{f.kl_mean:.4f}", f"{f.kl_p99:.3f}",
                      f"{f.top1_agreement:.4f}", escape(r.recipe))
    wide().print(table)
    if png is not None:
        err.print(f"[bold green]wrote[/] {escape(str(png))}", highlight=False)
