"""The ``quantkit`` command line: the only place that prints.

Exit codes: 0 success; 1 a clear error about the input, the output path or a checkpoint (one
line on stderr); 2 usage error; 3 an unexpected internal error (one line; ``--debug`` shows the
traceback); 4 ``recipe check --strict`` found a rule that matches no layer (or
only layers an earlier rule took); 130 interrupted (Ctrl-C or SIGTERM; the finished blocks are checkpointed, ``--resume`` goes on).
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
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import QuantkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-training weight quantization (GPTQ, RTN, recipes) for MLX language models.",
    epilog="Exit codes: 0 success, 1 bad input (one line on stderr), 2 usage error, "
           "3 internal error (--debug shows it), 4 recipe check --strict found warnings, "
           "130 interrupted. Docs: docs/cli.md",
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


class Backend(str, Enum):
    auto = "auto"
    mlx = "mlx"
    numpy = "numpy"


def internal_error(exc: BaseException) -> None:
    """An unexpected exception (a bug) as one line, exit code 3; ``--debug`` shows the traceback."""
    lines = str(exc).strip().splitlines()
    fail(f"internal error ({type(exc).__name__}: {lines[0] if lines else ''}); "
         "rerun with --debug for the traceback and report it", 3)


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
    target_bpw: Annotated[Optional[float], typer.Option(help="choose per-layer bits/group sizes for this many bits per weight (writes OUTPUT/recipe.toml)")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="plain-text calibration file (default: offline built-in text)")] = None,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    seed: Annotated[int, typer.Option(help="seed for choosing calibration windows")] = 0,
    dtype: Annotated[DType, typer.Option(help="dtype calibration runs in")] = DType.float32,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    backend: Annotated[Backend, typer.Option(help="compute backend of calibration's linear layers and Hessians (auto: numpy on a CPU device, mlx otherwise)")] = Backend.auto,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory (and discard a checkpoint)")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its checkpoint (starts afresh when there is none; a no-op on a finished output)")] = False,
    checkpoint: Annotated[bool, typer.Option(help="keep every finished block's shard as a checkpoint, so that --resume can continue")] = True,
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
    _return_freed_memory()
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    try:
        group = Distributed(num_shards=shards)
        if distributed:
            # Connecting gives up after --timeout with one line (SIGALRM interrupts it, see
            # connect_to_other_ranks). Should a platform not interrupt it, faulthandler's C
            # timer still ends the process a minute later (exit status 1, the stack on stderr).
            faulthandler.dump_traceback_later(timeout + 60, exit=True)
            try:
                group = Distributed.init(strict=True, num_shards=shards, timeout_s=timeout,
                                         on_timeout=_give_up)
            finally:
                faulthandler.cancel_dump_traceback_later()
        base = Recipe.from_toml(recipe) if recipe else Recipe()
        if not recipe and strategy is None and bits is None and group_size is None:
            base = Recipe()  # GPTQ 4-bit, group 64
        rec = base.with_default(
            strategy=strategy.value if strategy else None, bits=bits, group_size=group_size
        )
        plan = None
        if target_bpw is not None:
            from .mixed import plan_directory

            if group.size > 1:
                fail("--target-bpw plans in one process; plan first, then run the written "
                     "recipe with --recipe and --processes", 2)
            with _ProgressView(enabled=not (quiet or json_out)) as view:
                plan = plan_directory(
                    model_dir, target_bpw, rec, calibration=calibration, num_samples=num_samples,
                    seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                    progress=view,
                )
            rec = plan.recipe
        with _ProgressView(enabled=not (quiet or json_out) and group.rank == 0) as view, \
                _sigterm_as_interrupt():
            result = quantize_directory(
                model_dir, output, rec, calibration=calibration, num_samples=num_samples,
                seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                overwrite=overwrite, resume=resume, checkpoint=checkpoint, progress=view,
                distributed=group, backend=backend.value,
            )
        if plan is not None:
            (result.out_dir / "recipe.toml").write_text(plan.to_toml())
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
        internal_error(exc)
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
    if plan is not None:
        err.print(f"mixed precision: target {plan.target_bpw:g} bits per weight; plan written to "
                  f"{result.out_dir / 'recipe.toml'} (edit it and pass it to --recipe)",
                  highlight=False)


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), so
    a block's activations, weights and Hessians, once freed, stay in the heap as reusable but
    resident memory. A fixed 128 KiB threshold gives such buffers back to the system when freed:
    measured on a 4-block hidden-1024 llama (benchmarks/memory.py), the resident memory between
    blocks went from ~400 MB to ~180 MB. A process setting, so the CLI's, not the library's."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixes it: no dynamic raising)
    except (OSError, AttributeError):  # not glibc
        pass


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
    err.print(f"per-layer details: quantkit report {escape(str(out_dir))} --png FILE", highlight=False,
              soft_wrap=True)


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
        for k, v in tree_flatten(mx.load(str(f))):  # type: ignore[str-unpack]
            shapes[k] = v
    layers = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".scales")} |
                    {k for k, v in q.items() if isinstance(v, (dict, bool))})
    default = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    rows: list[dict[str, Any]] = []
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


# -- eval ---------------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="mlx-lm model directory (quantized or not)")],
    text: Annotated[Optional[Path], typer.Option(help="plain-text file to measure on (default: offline built-in text)")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    num_samples: Annotated[int, typer.Option(help="sequences to measure")] = 64,
    seed: Annotated[int, typer.Option(help="seed for choosing the windows of the text")] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the perplexity")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Perplexity of MODEL_DIR on a text: exp of the mean next-token loss (lower is better)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .calibration import make_batches, read_text, tokenize
    from .evaluate import perplexity
    from .io import load_model

    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    if text is not None and not text.is_file():
        fail(f"text file {text} does not exist; check the path")
    start = time.perf_counter()
    try:
        model, tokenizer, config = load_model(model_dir, allow_quantized=True)
        ids = tokenize(tokenizer, read_text(text), max_tokens=num_samples * seq_len)
        tokens = make_batches(ids, num_samples, seq_len, seed)
        bar = Progress(TextColumn("perplexity"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), console=err, transient=True, disable=quiet or json_out)
        with bar:
            task = bar.add_task("perplexity", total=int(tokens.shape[0]))
            ppl = perplexity(model, tokens, batch_size,
                             progress=lambda done, total: bar.update(task, completed=done))
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
        return
    except KeyboardInterrupt:
        fail("interrupted", 130)
        return
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        internal_error(exc)
        return
    from mlx_lm.utils import compute_bits_per_weight

    result = {
        "model": str(model_dir), "perplexity": ppl, "text": str(text or "builtin"),
        "num_samples": int(tokens.shape[0]), "seq_len": seq_len,
        "tokens": int(tokens.shape[0] * (seq_len - 1)),
        "quantized": bool(config.get("quantization")),
        "bits_per_weight": float(compute_bits_per_weight(model)),
        "time_s": time.perf_counter() - start,
    }
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


# -- report -------------------------------------------------------------------------------------


class SortBy(str, Enum):
    depth = "depth"
    error = "error"


def _read_report(path: Path):
    from .report import REPORT_NAME, RunReport

    directory = path.parent if path.is_file() else path
    if not (directory / REPORT_NAME).is_file():
        fail(f"{path} has no {REPORT_NAME}; pass a directory written by `quantkit quantize`")
    try:
        return RunReport.read(directory)
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        fail(f"{directory / REPORT_NAME} is not a quantkit run report ({type(exc).__name__}: {exc})")


def _wide() -> Console:
    """stdout, wide enough for long layer paths even when piped (rich assumes 80 columns)."""
    return out if out.is_terminal else Console(width=max(out.width, 150))


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


@app.command()
def report(
    out_dir: Annotated[Path, typer.Argument(help="directory written by `quantkit quantize`")],
    png: Annotated[Optional[Path], typer.Option(help="write a plot of error by layer and depth to this PNG file")] = None,
    top: Annotated[int, typer.Option(help="how many of the worst layers to highlight")] = 5,
    sort: Annotated[SortBy, typer.Option(help="row order")] = SortBy.depth,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing (with --png: only write the plot)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the layers and a summary as JSON")] = False,
) -> None:
    """Per-layer error table of a quantize run (and a PNG plot), worst layers highlighted."""
    import attrs

    from .plotting import layer_depth, plot_report, worst_layers

    run = _read_report(out_dir)
    worst = worst_layers(run, top)
    if png is not None:
        try:
            plot_report(run, png, top=top, title=str(out_dir))
        except QuantkitError as exc:
            fail(str(exc))
    if quiet:
        return
    summary = {
        "layers": len(run.layers), "strategies": run.strategy_counts(),
        "bits_per_weight": run.bits_per_weight, "time_s": run.time_s,
        "worst": [r.path for r in worst],
        "fallbacks": {r.path: r.reason for r in run.by_status("fallback")},
        "skipped": {r.path: r.reason for r in run.by_status("skipped")},
        "png": str(png) if png else None,
    }
    if json_out:
        out.print_json(json.dumps({"summary": summary, "layers": [
            {**attrs.asdict(r), "depth": layer_depth(r)} for r in run.layers]}))
        return
    rows = list(run.layers)
    if sort is SortBy.error:
        rows.sort(key=lambda r: -1.0 if r.relative_error is None else r.relative_error, reverse=True)
    else:
        rows.sort(key=lambda r: (layer_depth(r) is None, layer_depth(r) or 0))
    worst_paths = {r.path for r in worst}
    table = Table(title=f"{out_dir}  ({_fmt(run.bits_per_weight, '.3f')} bits per weight, "
                        f"{run.time_s:.1f} s)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("strategy", no_wrap=True)
    for col in ("bits", "group", "mode", "tokens", "damping", "H-error", "rel.err", "vs RTN", "time s"):
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
        table.add_row(escape(r.path), strategy, _fmt(r.bits, "d"), _fmt(r.group_size, "d"),
                      r.mode or "-", _fmt(r.n_tokens, "d"), _fmt(r.damping, "g"), _fmt(r.hessian_error),
                      _fmt(r.relative_error, ".2e"), _fmt(ratio, ".2f"), f"{r.time_s:.3f}",
                      style=style)
    _wide().print(table)
    if worst:
        out.print("worst layers by relative output error: " + ", ".join(
            f"{escape(r.path)} ({r.relative_error:.4f})" for r in worst), highlight=False, soft_wrap=True)
    for r in run.by_status("fallback"):
        out.print(f"[yellow]fell back to {r.strategy}[/] {escape(r.path)}: {escape(str(r.reason))}",
                  highlight=False, soft_wrap=True)
    for r in run.by_status("skipped"):
        out.print(f"[yellow]kept in full precision[/] {escape(r.path)}: {escape(str(r.reason))}",
                  highlight=False, soft_wrap=True)
    if png is not None:
        err.print(f"[bold green]wrote[/] {escape(str(png))}", highlight=False)


# -- recipe check -------------------------------------------------------------------------------

recipe_app = typer.Typer(no_args_is_help=True, help="Validate a recipe and see which layers its rules match.")
app.add_typer(recipe_app, name="recipe")


def _rule_label(index: int | None, rule: Any) -> str:
    return "default" if index is None else f"rule {index + 1} ({rule.match!r})"


@recipe_app.command("check")
def recipe_check(
    file: Annotated[Path, typer.Argument(help="recipe TOML file")],
    model: Annotated[Optional[Path], typer.Option(help="model directory: show which layers each rule matches")] = None,
    strict: Annotated[bool, typer.Option(help="exit with code 4 when a rule matches no layer")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only warnings and errors")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print rules, layers and warnings as JSON")] = False,
) -> None:
    """Validate a recipe FILE; with --model, show which layers each rule matches.

    Rules that match no layer, or only layers an earlier rule already took, are warned about."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .io import load_model
    from .recipe import Recipe
    from .report import RunReport
    from .walker import ModelWalker

    try:
        recipe = Recipe.from_toml(file)
    except QuantkitError as exc:
        fail(str(exc))
        return
    rules = [{"index": i + 1, **rule.to_dict()} for i, rule in enumerate(recipe.rules)]
    layers: list[dict[str, Any]] = []
    warnings: list[str] = []
    if model is not None:
        try:
            loaded, _, _ = load_model(model, lazy=True)
            skipped = RunReport()
            plans = ModelWalker(recipe=recipe).plan(loaded, skipped)
        except QuantkitError as exc:
            fail(str(exc))
            return
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
        paths = [d["path"] for d in layers]
        for i, rule in enumerate(recipe.rules):
            matched = [p for p in paths if rule.matches(p)]
            won = [d for d in layers if d["rule"] == i + 1]
            rules[i]["layers"] = len(won)
            if not matched:
                warnings.append(f"{_rule_label(i, rule)} matches no layer of {model}")
            elif not won:
                warnings.append(f"{_rule_label(i, rule)} matches {len(matched)} layer(s), all "
                                "taken by earlier rules (first match wins)")
    if json_out:
        out.print_json(json.dumps({"recipe": str(file), "default": recipe.to_dict()["default"],
                                   "rules": rules, "layers": layers, "warnings": warnings}))
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
                     _fmt(d.get("bits"), "d"), _fmt(d.get("group_size"), "d"),
                     str(d.get("mode", "-")), escape(opts)]
            if model is not None:
                cells.append(str(count) if count else "[yellow]0[/]")
            table.add_row(*cells)
        _wide().print(table)
        if layers:
            lt = Table(title=f"layers of {model}", box=box.SIMPLE_HEAD)
            for col in ("layer", "rule", "strategy", "bits", "group", "mode", "note"):
                lt.add_column(col, no_wrap=col != "note")
            for d in layers:
                lt.add_row(escape(d["path"]), "default" if d["rule"] is None else str(d["rule"]),
                           d["strategy"] if d["bits"] is not None else "[yellow]full precision[/]",
                           _fmt(d["bits"], "d"), _fmt(d["group_size"], "d"), str(d["mode"] or "-"),
                           escape(d["note"] or ""))
            _wide().print(lt)
        err.print(f"[bold green]ok[/] {escape(str(file))}: {len(recipe.rules)} rule(s)"
                  + (f", {len(layers)} layers planned" if model is not None else
                     "; pass --model DIR to see which layers each rule matches"), highlight=False, soft_wrap=True)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if strict and warnings:
        raise typer.Exit(4)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
