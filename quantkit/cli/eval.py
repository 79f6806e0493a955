"""``quantkit eval``: perplexity of a model directory on a text, or its fidelity to a float
reference (:mod:`quantkit.evaluate`, :func:`quantkit.compare.compare_models`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from .. import interrupt
from .app import (
    BatchSizeOption,
    DebugOption,
    NumSamplesOption,
    SeedOption,
    SeqLenOption,
    TextOption,
    app,
    check_windows,
    out,
    progress_bar,
    reported,
    wide,
)
from .signals import force_exit


@app.command("eval")
def eval_(
    model_dir: Annotated[str, typer.Argument(help="mlx-lm model directory (quantized or not), or a Hugging Face repo id (org/name)")],
    text: TextOption = None,
    reference: Annotated[Optional[Path], typer.Option(help="float model directory to compare with: adds KL(reference ‖ model) mean and 99th percentile, top-1 agreement and the reference's perplexity")] = None,
    seq_len: SeqLenOption = 512,
    num_samples: NumSamplesOption = 64,
    seed: SeedOption = 0,
    batch_size: BatchSizeOption = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the perplexity (with --reference: perplexity, KL mean, top-1 agreement)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    debug: DebugOption = False,
) -> None:
    """Perplexity of MODEL_DIR on a text: exp of the mean next-token loss (lower is better).

    With --reference FLOAT_DIR, also its fidelity to the float model on the same windows: per
    next-token position, KL(float ‖ model) (mean and 99th percentile, nats) and top-1 agreement
    (share of positions where both models' most likely token is the same)."""
    check_windows(num_samples, seq_len, batch_size, seed, text)
    start = time.perf_counter()
    with interrupt.handling(force_exit):
        _eval(model_dir, text, reference, seq_len, num_samples, seed, batch_size, quiet, json_out,
              debug, start)


def _eval(model_dir, text, reference, seq_len, num_samples, seed, batch_size, quiet, json_out, debug,
          start):
    from ..hub import resolve_model

    bar = progress_bar(disable=quiet or json_out)
    with reported(debug):
        if reference is not None:
            from ..compare import compare_models

            with bar:
                task = bar.add_task("KL to the reference", total=None)
                row = compare_models([resolve_model(model_dir)], resolve_model(reference), text, num_samples=num_samples,
                                     seq_len=seq_len, seed=seed, batch_size=batch_size,
                                     progress=lambda _, done, total: bar.update(task, completed=done, total=total))[0]
            _render_eval_reference(row, reference, text, seq_len, json_out, quiet,
                                   time.perf_counter() - start)
            return
        from ..compare import directory_perplexity

        with bar:
            task = bar.add_task("perplexity", total=None)
            measured = directory_perplexity(
                model_dir, text, num_samples=num_samples, seq_len=seq_len, seed=seed,
                batch_size=batch_size,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    ppl = measured.perplexity
    result = {**measured.to_dict(), "time_s": time.perf_counter() - start}
    if json_out:
        out.print_json(json.dumps(result))
    elif quiet:
        out.print(f"{ppl:.4f}", highlight=False)
    else:
        source = text.name if text else "the built-in text"
        out.print(f"{escape(str(model_dir))}: perplexity [bold]{ppl:.4f}[/] on "
                  f"{result['num_samples']}×{seq_len} tokens of {escape(source)} "
                  f"({result['bits_per_weight']:.2f} bits per weight, {result['time_s']:.1f} s)",
                  highlight=False, soft_wrap=True)


def _render_eval_reference(row, reference: Path, text: Optional[Path], seq_len: int,
                           json_out: bool, quiet: bool, seconds: float) -> None:
    f = row.fidelity
    result = {**row.to_dict(), "reference": str(reference), "text": str(text or "builtin"),
              "seq_len": seq_len, "time_s": seconds}
    if json_out:
        out.print_json(json.dumps(result))
        return
    if quiet:
        out.print(f"{f.perplexity:.4f} {f.kl_mean:.6f} {f.top1_agreement:.4f}", highlight=False)
        return
    source = text.name if text else "the built-in text"
    out.print(f"{escape(row.model)} against {escape(str(reference))}: {f.positions} next-token "
              f"positions of {escape(source)} ({row.bits_per_weight:.2f} bits per weight, "
              f"{seconds:.1f} s)", highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("", "model", "reference"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("perplexity", f"{f.perplexity:.4f}", f"{f.reference_perplexity:.4f}")
    table.add_row("KL(reference ‖ model) mean, nats", f"{f.kl_mean:.6f}", "0")
    table.add_row("KL 99th percentile, nats", f"{f.kl_p99:.6f}", "0")
    table.add_row("top-1 agreement", f"{f.top1_agreement:.4f}", "1")
    wide().print(table)
