"""The ``quantkit`` command line: the only place that prints.

Exit codes: 0 success; 1 a clear error about the input, the output path or a checkpoint (one
line on stderr); 2 usage error; 3 an unexpected internal error (one line; ``--debug`` shows the
traceback); 4 ``recipe check --strict`` found a rule that matches no layer (or
only layers an earlier rule took); 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM (the
finished blocks are checkpointed, ``--resume`` goes on). With ``--processes N`` the launcher
exits 1 when any rank fails, naming it.

Signals (see quantkit.interrupt and docs/reliability.md): when this module is the program, its
first statements install handlers that only set a flag, before typer, rich, MLX or mlx-lm are
imported; the library stops at its next check and the command ends with one line.
"""

from __future__ import annotations

import os
import sys

from . import interrupt


def _force_exit(signum: int) -> None:
    """A second Ctrl-C: end now (a half-written hidden directory is removed by the next run)."""
    os.write(2, b"error: interrupted again; stopped at once\n")
    os._exit(128 + signum)


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "quantkit":
    interrupt.install(_force_exit)  # the `quantkit` program: before the imports below

import faulthandler  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Optional  # noqa: E402

import typer  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from .errors import QuantkitError, describe  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-training weight quantization (GPTQ, RTN, recipes) for MLX language models.",
    epilog="Exit codes: 0 success, 1 bad input (one line on stderr), 2 usage error, "
           "3 internal error (--debug shows it), 4 recipe check --strict found warnings, "
           "130 interrupted (Ctrl-C), 143 stopped (SIGTERM). Docs: docs/cli.md",
)
out = Console()
err = Console(stderr=True)


def _strategy_names() -> list[str]:
    from .strategies import STRATEGIES

    return sorted(STRATEGIES)


def _load_plugins(plugins: list[str] | None) -> None:
    """Import the --plugin modules/files (their strategies and block methods register)."""
    from .plugins import load_plugins

    load_plugins(plugins or [])


def _check_strategy(strategy: str | None) -> None:
    """--strategy must name a registered strategy (checked once plugins are loaded)."""
    names = _strategy_names()
    if strategy is not None and strategy not in names:
        fail(f"unknown strategy {strategy!r} (--strategy); known: {', '.join(names)} "
             "(--plugin or a recipe's plugins add more)", 2)


PLUGIN_HELP = ("Python module or .py file registering strategies, block transforms or optimizers "
               "(repeatable)")


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
    fail(f"internal error ({type(exc).__name__}: {describe(exc, 200)}); "
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
        if event == "warning":  # shown even with --quiet: it is about the result
            self.bar.console.print(f"[yellow]warning:[/] {escape(info['message'])}",
                                   highlight=False, soft_wrap=True)
            return
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
    model_dir: Annotated[str, typer.Argument(help="mlx-lm model directory (full precision), or a Hugging Face repo id (org/name)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model directory")],
    bits: Annotated[Optional[int], typer.Option(help="bits for the default rule [4]")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="group size for the default rule [64]")] = None,
    strategy: Annotated[Optional[str], typer.Option(metavar="NAME", help="default strategy [gptq]: one of " + ", ".join(_strategy_names()) + ", or one a plugin registers")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="recipe TOML file")] = None,
    plugin: Annotated[Optional[list[str]], typer.Option(metavar="MODULE_OR_FILE", help=PLUGIN_HELP)] = None,
    target_bpw: Annotated[Optional[float], typer.Option(help="choose per-layer bits/group sizes for this many bits per weight (writes OUTPUT/recipe.toml)")] = None,
    calibration: Annotated[Optional[list[str]], typer.Option(help="calibration text: a plain-text or .jsonl file (rows {\"text\"} or chat {\"messages\"}); repeat as PATH:WEIGHT for a mixture (default: offline built-in text)")] = None,
    pack: Annotated[bool, typer.Option("--pack", help="cut calibration samples anywhere in the joined documents (default: every sample starts at a document)")] = False,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    seed: Annotated[int, typer.Option(help="seed for choosing calibration windows")] = 0,
    dtype: Annotated[DType, typer.Option(help="dtype calibration runs in")] = DType.float32,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    backend: Annotated[Backend, typer.Option(help="compute backend of calibration's linear layers and Hessians (auto: numpy on a CPU device, mlx otherwise)")] = Backend.auto,
    fast: Annotated[bool, typer.Option("--fast", help="leave out the block transforms and optimizers (AWQ, learned rounding) of the default pipeline or the recipe: much quicker, a little less accurate (docs/results-quality.md)")] = False,
    moe_calibrate_all_experts: Annotated[bool, typer.Option("--moe-calibrate-all-experts", help="collect every expert's Hessian from every calibration token (the block output still follows the router): no expert starved")] = False,
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
    start = time.perf_counter()
    from .launch import LAUNCHER_PID, follow_launcher
    from .validate import check_settings, launcher_environment, removing_created_parents

    if processes < 1 or shards < 1:
        fail("--processes and --shards must be ≥ 1", 2)
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    try:
        check_settings(seed=seed, target_bpw=target_bpw, timeout_s=timeout)
    except QuantkitError as exc:
        fail(str(exc), 2)
    launched_by = launcher_environment()
    if launched_by and not distributed:
        fail(f"this process is one rank of a launched group ({launched_by} is set) but "
             "--distributed is not given: add --distributed to the quantize command (or run it "
             f"without the launcher, with {launched_by} unset)", 2)
    ranked = distributed and os.environ.get(LAUNCHER_PID, "").isdigit()
    if ranked:  # started by --processes: die with the launcher, let it report interruptions
        follow_launcher(int(os.environ[LAUNCHER_PID]))
    with interrupt.handling(_force_exit):
        if processes > 1 and not distributed:
            _launch(ctx, processes, quiet or json_out)
            return
        try:
            with removing_created_parents(output):
                result, plan, rank = _quantize(
                    model_dir, output, recipe=recipe, plugin=plugin, bits=bits, group_size=group_size,
                    strategy=strategy, fast=fast, target_bpw=target_bpw, calibration=calibration, pack=pack,
                    moe_calibrate_all_experts=moe_calibrate_all_experts, num_samples=num_samples, seq_len=seq_len, seed=seed, dtype=dtype,
                    batch_size=batch_size, backend=backend, overwrite=overwrite, resume=resume,
                    checkpoint=checkpoint, quiet=quiet or json_out, distributed=distributed,
                    shards=shards, timeout=timeout)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            code = getattr(exc, "exit_code", 130)
            if ranked:
                raise typer.Exit(code) from None
            fail(_interrupted(exc, output, checkpoint), code)
            return
        except QuantkitError as exc:
            if debug:
                raise
            fail(str(exc))
            return
        except typer.Exit:
            raise
        except Exception as exc:  # a bug: one line, the traceback with --debug
            if debug:
                raise
            internal_error(exc)
            return
    report = result.report
    if rank != 0:
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


def _quantize(model_dir, output, *, recipe, plugin, bits, group_size, strategy, fast, target_bpw, calibration,
              pack, moe_calibrate_all_experts, num_samples, seq_len, seed, dtype, batch_size, backend, overwrite, resume,
              checkpoint, quiet, distributed, shards, timeout):
    """The work of ``quantize`` in this process: ``(result, plan or None, rank)``."""
    from .api import quantize_directory
    from .data import Calibration
    from .defaults import default_recipe, without_block_methods
    from .distributed import Distributed
    from .hub import resolve_model
    from .recipe import Recipe

    interrupt.check("imports")
    _return_freed_memory()
    calib = Calibration.from_specs(calibration, pack=pack)
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
    model_dir = resolve_model(model_dir)  # after joining the group: every rank resolves it
    _load_plugins(plugin)
    base = Recipe.from_toml(recipe) if recipe else None
    _check_strategy(strategy)
    if base is None:  # --strategy at its own defaults, else the built-in pipeline
        base = Recipe() if strategy else default_recipe()
    if fast:
        base = without_block_methods(base)
    rec = base.with_default(strategy=strategy, bits=bits, group_size=group_size)
    if moe_calibrate_all_experts:  # the recipe's [moe] calibrate_all_experts = true
        rec = rec.with_moe(calibrate_all_experts=True)
    plan = None
    if target_bpw is not None:
        from .mixed import plan_directory

        if group.size > 1:
            fail("--target-bpw plans in one process; plan first, then run the written "
                 "recipe with --recipe and --processes", 2)
        with _ProgressView(enabled=not quiet) as view:
            plan = plan_directory(
                model_dir, target_bpw, rec, calibration=calib, num_samples=num_samples,
                seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                progress=view,
            )
        rec = plan.recipe
    with _ProgressView(enabled=not quiet and group.rank == 0) as view:
        result = quantize_directory(
            model_dir, output, rec, calibration=calib, num_samples=num_samples,
            seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
            overwrite=overwrite, resume=resume, checkpoint=checkpoint, progress=view,
            distributed=group, backend=backend.value,
        )
    if plan is not None:
        (result.out_dir / "recipe.toml").write_text(plan.to_toml())
        if plan.annotate_report(result.report):  # each layer's output KL, where measured
            result.report.write(result.out_dir)
    return result, plan, group.rank


def _interrupted(exc: BaseException, output: Path, checkpoint: bool) -> str:
    """The one line for a stopped run: which signal, and what is left (no output; the
    checkpointed blocks, if any)."""
    from .checkpoint import checkpoint_dir, read_progress

    how = f"interrupted ({exc})" if isinstance(exc, interrupt.Interrupted) else "interrupted"
    done = read_progress(checkpoint_dir(output)) if checkpoint else None
    if done:
        return (f"{how}; {done} finished blocks are checkpointed in {checkpoint_dir(output)}: "
                "rerun the same command with --resume to continue")
    return f"{how}; nothing was written to {output}"


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
        elif isinstance(value, (list, tuple)):  # a repeatable option (--plugin)
            for v in value:
                args += [param.opts[0], str(v)]
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
    except KeyboardInterrupt as exc:
        how = f"interrupted ({exc})" if isinstance(exc, interrupt.Interrupted) else "interrupted"
        fail(f"{how}; stopped every rank; nothing was written to {ctx.params['output']}",
             getattr(exc, "exit_code", 130))
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
    model_dir: Annotated[str, typer.Argument(help="quantized model directory, or a Hugging Face repo id (org/name)")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """List each layer's quantization settings as mlx_lm.load will apply them."""
    from .hub import resolve_model
    from .inspection import quantized_layers

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


# -- eval ---------------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    model_dir: Annotated[str, typer.Argument(help="mlx-lm model directory (quantized or not), or a Hugging Face repo id (org/name)")],
    text: Annotated[Optional[Path], typer.Option(help="plain-text file to measure on (default: offline built-in text)")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="float model directory to compare with: adds KL(reference ‖ model) mean and 99th percentile, top-1 agreement and the reference's perplexity")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    num_samples: Annotated[int, typer.Option(help="sequences to measure")] = 64,
    seed: Annotated[int, typer.Option(help="seed for choosing the windows of the text")] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the perplexity (with --reference: perplexity, KL mean, top-1 agreement)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Perplexity of MODEL_DIR on a text: exp of the mean next-token loss (lower is better).

    With --reference FLOAT_DIR, also its fidelity to the float model on the same windows: per
    next-token position, KL(float ‖ model) (mean and 99th percentile, nats) and top-1 agreement
    (share of positions where both models' most likely token is the same)."""
    from .errors import SettingsError
    from .validate import check_input_file, check_settings

    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    try:
        check_settings(seed=seed)
        if text is not None:
            check_input_file(text, "text file")
    except QuantkitError as exc:
        fail(str(exc), 2 if isinstance(exc, SettingsError) else 1)
    start = time.perf_counter()
    with interrupt.handling(_force_exit):
        _eval(model_dir, text, reference, seq_len, num_samples, seed, batch_size, quiet, json_out,
              debug, start)


def _eval(model_dir, text, reference, seq_len, num_samples, seed, batch_size, quiet, json_out, debug,
          start):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .calibration import make_batches, read_text, tokenize
    from .evaluate import perplexity
    from .hub import resolve_model
    from .io import load_model

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=True, disable=quiet or json_out)
    try:
        if reference is not None:
            from .compare import compare_models

            with bar:
                task = bar.add_task("KL to the reference", total=None)
                row = compare_models([resolve_model(model_dir)], resolve_model(reference), text, num_samples=num_samples,
                                     seq_len=seq_len, seed=seed, batch_size=batch_size,
                                     progress=lambda _, done, total: bar.update(task, completed=done, total=total))[0]
            _render_eval_reference(row, reference, text, seq_len, json_out, quiet,
                                   time.perf_counter() - start)
            return
        model, tokenizer, config = load_model(resolve_model(model_dir), allow_quantized=True)
        ids = tokenize(tokenizer, read_text(text), max_tokens=num_samples * seq_len)
        tokens = make_batches(ids, num_samples, seq_len, seed)
        with bar:
            task = bar.add_task("perplexity", total=int(tokens.shape[0]))
            ppl = perplexity(model, tokens, batch_size,
                             progress=lambda done, total: bar.update(task, completed=done))
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
        return
    except KeyboardInterrupt as exc:
        if debug:
            raise
        fail(f"interrupted ({exc})" if isinstance(exc, interrupt.Interrupted) else "interrupted",
             getattr(exc, "exit_code", 130))
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
    _wide().print(table)


# -- compare ------------------------------------------------------------------------------------


@app.command()
def compare(
    model_dirs: Annotated[list[str], typer.Argument(help="quantized model directories or Hugging Face repo ids (any number)")],
    reference: Annotated[str, typer.Option(help="the float model they were quantized from (a directory or a repo id)")],
    text: Annotated[Optional[Path], typer.Option(help="plain-text file to measure on (default: offline built-in text)")] = None,
    png: Annotated[Optional[Path], typer.Option(help="write a plot of KL (log scale) against bits per weight to this PNG file")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    num_samples: Annotated[int, typer.Option(help="sequences to measure")] = 64,
    seed: Annotated[int, typer.Option(help="seed for choosing the windows of the text")] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing (with --png: only write the plot)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Several quantized models against their float model on the same windows of a text: bits
    per weight, size, perplexity, KL(float ‖ model) mean and 99th percentile, top-1 agreement
    and the recipe of each; --png draws KL against bits per weight."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .compare import compare_models
    from .plotting import plot_comparison

    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    from .errors import SettingsError
    from .validate import check_input_file, check_output_file, check_settings

    try:
        check_settings(seed=seed)
        if text is not None:
            check_input_file(text, "text file")
        if png is not None:
            check_output_file(png, "the plot", "pass a PNG file name")
    except QuantkitError as exc:
        fail(str(exc), 2 if isinstance(exc, SettingsError) else 1)
    if png is not None:
        try:
            import matplotlib  # noqa: F401  (checked before the models run, not after)
        except ImportError:
            fail("drawing the plot needs matplotlib; install it with pip install 'quantkit[plot]'")
    start = time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=True, disable=quiet or json_out)
    tasks: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(escape(name), total=total)
        bar.update(tasks[name], completed=done)

    try:
        with bar, interrupt.handling(_force_exit):
            rows = compare_models(model_dirs, reference, text, num_samples=num_samples,
                                  seq_len=seq_len, seed=seed, batch_size=batch_size,
                                  progress=progress)
        if png is not None:
            plot_comparison([r.to_dict() for r in rows], png,
                            title=f"KL to {Path(reference).name} on {text.name if text else 'the built-in text'}")
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
        return
    except KeyboardInterrupt as exc:
        if debug:
            raise
        how = f"interrupted ({exc})" if isinstance(exc, interrupt.Interrupted) else "interrupted"
        fail(f"{how}; nothing was written", getattr(exc, "exit_code", 130))
        return
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        internal_error(exc)
        return
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
    out.print(f"against {escape(str(reference))} (perplexity {_fmt(ref_ppl, '.4f')}) on {positions} "
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
    _wide().print(table)
    if png is not None:
        err.print(f"[bold green]wrote[/] {escape(str(png))}", highlight=False)


# -- report -------------------------------------------------------------------------------------


class SortBy(str, Enum):
    depth = "depth"
    error = "error"
    kl = "kl"


def _read_report(path: Path):
    from .report import REPORT_NAME, RunReport
    from .validate import check_input_file

    directory = path.parent if path.is_file() else path
    if not (directory / REPORT_NAME).exists():
        fail(f"{path} has no {REPORT_NAME}; pass a directory written by `quantkit quantize`")
    try:
        check_input_file(directory / REPORT_NAME, "run report", fix="pass a directory written by `quantkit quantize`")
        return RunReport.read(directory)
    except QuantkitError as exc:
        fail(str(exc))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # ValueError: JSON, UTF-8
        fail(f"{directory / REPORT_NAME} is not a quantkit run report ({type(exc).__name__}: {describe(exc)})")


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
    sort: Annotated[SortBy, typer.Option(help="row order: depth, error (relative output error) or kl (contribution to the output KL, where measured)")] = SortBy.depth,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing (with --png: only write the plot)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the layers and a summary as JSON")] = False,
) -> None:
    """Per-layer error table of a quantize run (and a PNG plot), worst layers highlighted."""
    import attrs

    from .plotting import layer_depth, plot_report, worst_layers

    run = _read_report(out_dir)
    worst = worst_layers(run, top)
    with_kl = [r for r in run.layers if r.output_kl is not None]
    worst_kl = sorted(with_kl, key=lambda r: r.output_kl or 0.0, reverse=True)[: max(top, 0)]
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
        "worst_by_output_kl": [r.path for r in worst_kl],
        "output_kl_total": sum(r.output_kl or 0.0 for r in with_kl) if with_kl else None,
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
    elif sort is SortBy.kl:
        rows.sort(key=lambda r: -1.0 if r.output_kl is None else r.output_kl, reverse=True)
    else:
        rows.sort(key=lambda r: (layer_depth(r) is None, layer_depth(r) or 0))
    worst_paths = {r.path for r in worst}
    table = Table(title=f"{out_dir}  ({_fmt(run.bits_per_weight, '.3f')} bits per weight, "
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
        cells = [escape(r.path), strategy, _fmt(r.bits, "d"), _fmt(r.group_size, "d"),
                 r.mode or "-", _fmt(r.n_tokens, "d"), _fmt(r.damping, "g"), _fmt(r.hessian_error),
                 _fmt(r.relative_error, ".2e"), _fmt(ratio, ".2f")]
        if with_kl:
            cells.append(_fmt(r.output_kl, ".2e"))
        table.add_row(*cells, f"{r.time_s:.3f}", style=style)
    _wide().print(table)
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


# -- recipe check -------------------------------------------------------------------------------

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
    from .coverage import check_recipe
    from .recipe import Recipe

    try:
        _load_plugins(plugin)
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
                     _fmt(d.get("bits"), "d"), _fmt(d.get("group_size"), "d"),
                     str(d.get("mode", "-")), escape(opts)]
            if model is not None:
                cells.append(str(count) if count else "[yellow]0[/]")
            table.add_row(*cells)
        _wide().print(table)
        mt = Table(title="methods the recipe uses", box=box.SIMPLE_HEAD)
        for col in ("kind", "name", "class", "plugin"):
            mt.add_column(col, no_wrap=col != "plugin")
        for m in checked.methods:
            mt.add_row(m["kind"], escape(m["name"]), escape(m["class"]), escape(m["plugin"]))
        _wide().print(mt)
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
    """The ``quantkit`` program: signal handlers first (see :mod:`quantkit.interrupt`)."""
    interrupt.install(_force_exit)
    try:
        interrupt.check("imports")
    except interrupt.Interrupted as exc:
        err.print(f"[bold red]error:[/] interrupted ({exc}) while starting; nothing was written",
                  highlight=False)
        sys.exit(exc.exit_code)
    try:
        app()
    finally:
        interrupt.ignore()  # done: a signal while Python shuts down must not change the status


if __name__ == "__main__":
    main()
