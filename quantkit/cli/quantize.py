"""``quantkit quantize``: options → :func:`quantkit.api.quantize_directory` (after
:func:`quantkit.mixed.plan_directory` with ``--target-bpw``) → a summary; ``--processes N``
starts N ranks of this command (:mod:`quantkit.launch`)."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import attrs
import typer
from rich.markup import escape

from .. import interrupt
from ..errors import QuantkitError
from .app import (
    PLUGIN_HELP,
    Backend,
    DType,
    ProgressView,
    app,
    check_strategy,
    err,
    fail,
    internal_error,
    load_plugin_args,
    out,
    strategy_names,
)
from .signals import force_exit


@app.command()
def quantize(
    ctx: typer.Context,
    model_dir: Annotated[str, typer.Argument(help="mlx-lm model directory (full precision), or a Hugging Face repo id (org/name)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model directory")],
    bits: Annotated[Optional[int], typer.Option(help="bits for the default rule [4]")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="group size for the default rule [64]")] = None,
    strategy: Annotated[Optional[str], typer.Option(metavar="NAME", help="default strategy [gptq]: one of " + ", ".join(strategy_names()) + ", or one a plugin registers")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="recipe TOML file")] = None,
    plugin: Annotated[Optional[list[str]], typer.Option(metavar="MODULE_OR_FILE", help=PLUGIN_HELP)] = None,
    target_bpw: Annotated[Optional[float], typer.Option(help="choose per-layer bits/group sizes for this many bits per weight (writes OUTPUT/recipe.toml)")] = None,
    calibration: Annotated[Optional[list[str]], typer.Option(help="calibration text: a plain-text or .jsonl file (rows {\"text\"} or chat {\"messages\"}); repeat as PATH:WEIGHT for a mixture (default: offline built-in text)")] = None,
    pack: Annotated[bool, typer.Option("--pack", help="cut calibration samples anywhere in the joined documents (default: every sample starts at a document)")] = False,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    seed: Annotated[int, typer.Option(help="seed for choosing calibration windows")] = 0,
    dtype: Annotated[DType, typer.Option(help="dtype calibration runs in")] = DType.float32,
    batch_size: Annotated[Optional[int], typer.Option(help="sequences per forward pass (default: 8 on a CPU; on a GPU up to 32, as many as keep a batch's widest activation within 256 MB)")] = None,
    backend: Annotated[Backend, typer.Option(help="compute backend of calibration's linear layers and Hessians (auto: numpy on a CPU device, mlx otherwise)")] = Backend.auto,
    fast: Annotated[bool, typer.Option("--fast", help="leave out the block transforms, optimizers and end-to-end distillation (AWQ, learned rounding, [distill]) of the default pipeline or the recipe: much quicker, a little less accurate (docs/results-quality.md)")] = False,
    distill: Annotated[bool, typer.Option("--distill", help="add end-to-end distillation of every layer's scales and biases towards the float model's next-token distributions (a [distill] table at its defaults) to a --recipe or --strategy run that lacks it; the default pipeline has it, --fast leaves it out (docs/results-quality.md)")] = False,
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
    from ..launch import LAUNCHER_PID, follow_launcher
    from ..validate import check_settings, launcher_environment, removing_created_parents

    if processes < 1 or shards < 1:
        fail("--processes and --shards must be ≥ 1", 2)
    if num_samples < 1 or seq_len < 2 or (batch_size is not None and batch_size < 1):
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
    with interrupt.handling(force_exit):
        if processes > 1 and not distributed:
            _launch(ctx, processes, quiet or json_out)
            return
        try:
            with removing_created_parents(output):
                result, plan, rank = _quantize(
                    model_dir, output, recipe=recipe, plugin=plugin, bits=bits, group_size=group_size,
                    strategy=strategy, fast=fast, distill=distill, target_bpw=target_bpw, calibration=calibration, pack=pack,
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
                  f"{escape(str(result.out_dir / 'recipe.toml'))} (edit it and pass it to "
                  "--recipe)", highlight=False, soft_wrap=True)


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), so
    a block's activations, weights and Hessians, once freed, stay in the heap as reusable but
    resident memory. A fixed 128 KiB threshold gives such buffers back to the system when freed:
    measured on a 4-block hidden-1024 llama (benchmarks/memory.py), the resident memory between
    blocks went from ~400 MB to ~180 MB. A process setting, so the CLI's, not the library's.

    On a CPU device MLX's buffer cache is turned off as well: freed arrays go back to malloc
    (and so to the system) instead of staying resident for reuse; measured with
    benchmarks/memory.py, the cache held ~30 MB at the job's peaks."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(0)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixes it: no dynamic raising)
    except (OSError, AttributeError):  # not glibc
        pass


def _quantize(model_dir, output, *, recipe, plugin, bits, group_size, strategy, fast, distill, target_bpw, calibration,
              pack, moe_calibrate_all_experts, num_samples, seq_len, seed, dtype, batch_size, backend, overwrite, resume,
              checkpoint, quiet, distributed, shards, timeout):
    """The work of ``quantize`` in this process: ``(result, plan or None, rank)``."""
    from ..api import quantize_directory
    from ..calibration import CPU_BATCH
    from ..data import Calibration
    from ..defaults import default_recipe, without_block_methods
    from ..distributed import Distributed
    from ..hub import resolve_model
    from ..pipeline.distill import Distillation
    from ..recipe import Recipe

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
    load_plugin_args(plugin)
    base = Recipe.from_toml(recipe) if recipe else None
    check_strategy(strategy)
    if base is None:  # --strategy at its own defaults, else the built-in pipeline
        base = Recipe() if strategy else default_recipe()
    if fast:
        base = without_block_methods(base)
    if distill and base.distill is None:
        base = attrs.evolve(base, distill=Distillation())
    rec = base.with_default(strategy=strategy, bits=bits, group_size=group_size)
    if moe_calibrate_all_experts:  # the recipe's [moe] calibrate_all_experts = true
        rec = rec.with_moe(calibrate_all_experts=True)
    plan = None
    if target_bpw is not None:
        from ..mixed import plan_directory

        if group.size > 1:
            fail("--target-bpw plans in one process; plan first, then run the written "
                 "recipe with --recipe and --processes", 2)
        with ProgressView(enabled=not quiet) as view:
            plan = plan_directory(
                model_dir, target_bpw, rec, calibration=calib, num_samples=num_samples,
                seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size or CPU_BATCH,
                progress=view,
            )
        rec = plan.recipe
    with ProgressView(enabled=not quiet and group.rank == 0) as view:
        result = quantize_directory(
            model_dir, output, rec, calibration=calib, num_samples=num_samples,
            seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
            overwrite=overwrite, resume=resume, checkpoint=checkpoint, progress=view,
            distributed=group, backend=backend.value,
        )
    if plan is not None:
        plan.write_into(result.out_dir, result.report)
    return result, plan, group.rank


def _interrupted(exc: BaseException, output: Path, checkpoint: bool) -> str:
    """The one line for a stopped run: which signal, and what is left (no output; the
    checkpointed blocks, if any)."""
    from ..checkpoint import checkpoint_dir, read_progress

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
    from ..launch import launch_local

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
    err.print(f"[bold green]wrote[/] {escape(str(out_dir))}  ({seconds:.1f} s, "
              f"{report.bits_per_weight:.3f} bits per weight)", highlight=False, soft_wrap=True)
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
    for m in report.block_methods:
        if m["kind"] == "distill":
            f = m["figures"]
            what = "kept" if f["kept"] else "not kept: it did not lower it"
            err.print(f"distillation: calibration KL to the float model {f['kl_before']:.4f} → "
                      f"{f['kl_after']:.4f} ({what}; {f['steps']} steps, {f['seconds']:.0f} s)",
                      highlight=False)
    err.print(f"per-layer details: quantkit report {escape(str(out_dir))} --png FILE", highlight=False,
              soft_wrap=True)
