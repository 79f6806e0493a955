"""The ``quantkit`` command line: the only place that prints.

Exit codes: 0 success; 1 a clear error about the input, the output path or a checkpoint (one
line on stderr); 2 usage error; 3 an unexpected internal error (one line; ``--debug`` shows the
traceback); 130 interrupted (Ctrl-C or SIGTERM; the finished blocks are checkpointed, ``--resume`` goes on).
With ``--processes N`` the launcher exits 1 when any rank fails, naming it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import QuantkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-training weight quantization (GPTQ, RTN, recipes) for MLX language models.",
)
out = Console()
err = Console(stderr=True)


class Strategy(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _ProgressView:
    """Renders walker progress events as rich progress bars on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=err, transient=True, disable=not enabled)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "resume":
            if self.enabled:
                self.bar.console.print(f"resuming: {info['index'] + 1}/{info['total']} blocks "
                                       "done in the checkpoint", highlight=False)
            name = "quantizing blocks"
            self.tasks[name] = self.bar.add_task(name, total=info["total"], completed=info["index"] + 1)
            return
        if event in ("capture", "block"):
            name = {"capture": "capturing inputs", "block": "quantizing blocks"}[event]
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=info["total"])
            self.bar.update(self.tasks[name], completed=info["index"] + 1)


@app.command()
def quantize(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help="mlx-lm model directory (full precision)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model directory")],
    bits: Annotated[Optional[int], typer.Option(help="bits for the default rule [4]")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="group size for the default rule [64]")] = None,
    strategy: Annotated[Optional[Strategy], typer.Option(help="default strategy [gptq]")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="recipe TOML file")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="plain-text calibration file (default: offline built-in text)")] = None,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    seed: Annotated[int, typer.Option(help="seed for choosing calibration windows")] = 0,
    dtype: Annotated[DType, typer.Option(help="dtype calibration runs in")] = DType.float32,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory (and discard a checkpoint)")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its checkpoint (starts afresh when there is none)")] = False,
    checkpoint: Annotated[bool, typer.Option(help="checkpoint after every decoder block, so that --resume can continue")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or summary")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the run report as JSON")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
    processes: Annotated[int, typer.Option(help="start this many ranks on this machine (ring backend over 127.0.0.1)")] = 1,
    distributed: Annotated[bool, typer.Option("--distributed", help="join the process group set up by a launcher (mlx.launch, or MLX_RANK/MLX_HOSTFILE)")] = False,
    shards: Annotated[int, typer.Option(help="calibration shards; the output depends on this, never on the number of processes")] = 8,
    timeout: Annotated[float, typer.Option(help="seconds a rank waits for the others (connecting, combining, exchanging) before giving up")] = 1800.0,
) -> None:
    """Quantize MODEL_DIR into OUTPUT (a directory mlx_lm.load reads unchanged).

    Several processes (see docs/distributed.md): --processes N on one machine; on several
    machines, mlx.launch ... quantize ... --distributed. Either way rank 0 writes OUTPUT."""
    from .api import quantize_directory
    from .checkpoint import checkpoint_dir, read_progress
    from .distributed import Distributed
    from .recipe import Recipe

    if processes < 1 or shards < 1:
        fail("--processes and --shards must be ≥ 1", 2)
    if processes > 1 and not distributed:
        _launch(ctx, processes, quiet or json_out)
        return
    start = time.perf_counter()
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    try:
        group = Distributed(num_shards=shards)
        if distributed:
            # Connecting holds the GIL, so the watchdog thread cannot run: faulthandler's C
            # timer ends the process instead (exit status 1, the stack on stderr).
            faulthandler.dump_traceback_later(timeout, exit=True)
            group = Distributed.init(strict=True, num_shards=shards, timeout_s=timeout,
                                     on_timeout=_give_up)
            faulthandler.cancel_dump_traceback_later()
        base = Recipe.from_toml(recipe) if recipe else Recipe()
        if not recipe and strategy is None and bits is None and group_size is None:
            base = Recipe()  # GPTQ 4-bit, group 64
        rec = base.with_default(
            strategy=strategy.value if strategy else None, bits=bits, group_size=group_size
        )
        with _ProgressView(enabled=not (quiet or json_out) and group.rank == 0) as view, \
                _sigterm_as_interrupt():
            result = quantize_directory(
                model_dir, output, rec, calibration=calibration, num_samples=num_samples,
                seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                overwrite=overwrite, resume=resume, checkpoint=checkpoint, progress=view,
                distributed=group,
            )
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
        return
    except KeyboardInterrupt:
        if debug:
            raise
        done = read_progress(checkpoint_dir(output)) if checkpoint else None
        if done:
            fail(f"interrupted; {done} finished blocks are checkpointed in {checkpoint_dir(output)}: "
                 "rerun the same command with --resume to continue", 130)
        fail(f"interrupted; nothing was written to {output}", 130)
        return
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        text = str(exc).strip().splitlines()
        fail(f"internal error ({type(exc).__name__}: {text[0] if text else ''}); "
             "rerun with --debug for the traceback and report it", 3)
        return
    report = result.report
    if group.rank != 0:
        return
    if json_out:
        out.print_json(json.dumps(report.to_dict()))
        return
    if quiet:
        return
    _print_summary(report, result.out_dir, time.perf_counter() - start)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (``kill``, job schedulers, ``timeout``) like Ctrl-C: a clean, resumable stop."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _give_up(message: str) -> None:
    """Watchdog: a rank waited too long for the others. A collective blocked in MLX cannot
    be interrupted, so end the process here."""
    err.print(f"[bold red]error:[/] {escape(message)}; giving up (raise --timeout if ranks are "
              "just slow)", highlight=False, soft_wrap=True)
    os._exit(1)


def _rank_argv(ctx: typer.Context, rank: int, quiet: bool) -> list[str]:
    """The command line of one rank: this command with the same parameters, ``--distributed``
    instead of ``--processes``; ranks other than 0 run quiet."""
    args = [sys.executable, "-m", "quantkit.cli", ctx.info_name or "quantize"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("processes", "distributed", "quiet", "json_out"):
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif getattr(param, "is_flag", False):
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        elif value is not None:
            args += [param.opts[0], str(value.value if isinstance(value, Enum) else value)]
    if rank > 0 or quiet:
        args.append("--quiet")
    if rank == 0 and ctx.params.get("json_out"):
        args.append("--json")
    return args + ["--distributed"]


def _launch(ctx: typer.Context, n: int, quiet: bool) -> None:
    from .launch import launch_local

    start = time.perf_counter()
    try:
        result = launch_local(lambda rank: _rank_argv(ctx, rank, quiet), n)
    except KeyboardInterrupt:
        fail(f"interrupted; stopped every rank; nothing was written to {ctx.params['output']}", 130)
        return
    if not result.ok:
        fail(f"distributed run failed: {result.describe()}; "
             f"{ctx.params['output']} was not written by this run")
    if not quiet:
        err.print(f"{n} processes finished in {time.perf_counter() - start:.1f} s", highlight=False)


def _print_summary(report, out_dir: Path, seconds: float) -> None:
    counts = report.strategy_counts()
    quantized = [r for r in report.layers if r.status != "skipped"]
    err.print(f"[bold green]wrote[/] {out_dir}  ({seconds:.1f} s, "
              f"{report.bits_per_weight:.3f} bits per weight)", highlight=False)
    err.print("layers: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), highlight=False)
    for r in report.layers:
        if r.status == "skipped":
            err.print(f"  [yellow]kept in full precision[/] {r.path}: {escape(str(r.reason))}",
                      highlight=False)
        elif r.status == "fallback":
            err.print(f"  [yellow]fell back to {r.strategy}[/] {r.path}: {escape(str(r.reason))}",
                      highlight=False)
    errs = [r.relative_error for r in quantized if r.relative_error is not None]
    if errs:
        err.print(f"mean relative output error {sum(errs) / len(errs):.4f}, "
                  f"worst {max(errs):.4f}", highlight=False)


@app.command()
def inspect(
    model_dir: Annotated[Path, typer.Argument(help="quantized model directory")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """List each layer's quantization settings as mlx_lm.load will apply them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        fail(f"{model_dir} has no config.json; pass a model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        fail(f"{config_path} is not valid JSON ({exc})")
    q = config.get("quantization")
    if not q:
        fail(f"{model_dir} is not quantized (config.json has no 'quantization')")
    shapes: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for k, v in tree_flatten(mx.load(str(f))):
            shapes[k] = v
    layers = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".scales")} |
                    {k for k, v in q.items() if isinstance(v, (dict, bool))})
    default = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    rows = []
    for path in layers:
        setting = q.get(path, default)
        if setting is False:
            rows.append({"path": path, "bits": None, "group_size": None, "mode": None, "quantized": False})
        else:
            rows.append({"path": path, "bits": setting.get("bits"), "group_size": setting.get("group_size"),
                         "mode": setting.get("mode", "affine"), "quantized": True})
    if json_out:
        out.print_json(json.dumps({"default": default, "layers": rows}))
        return
    table = Table(title=f"{model_dir}  (default: {default})")
    for col in ("layer", "bits", "group", "mode"):
        table.add_column(col)
    for r in rows:
        if r["quantized"]:
            table.add_row(r["path"], str(r["bits"]), str(r["group_size"]), r["mode"])
        else:
            table.add_row(r["path"], "-", "-", "[yellow]full precision[/]")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
