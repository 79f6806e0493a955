"""The ``quantkit`` command line: the only place that prints.

Exit codes: 0 success; 1 a clear error about the input (one line on stderr); 2 usage error.
"""

from __future__ import annotations

import json
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
        if event in ("capture", "block"):
            name = {"capture": "capturing inputs", "block": "quantizing blocks"}[event]
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=info["total"])
            self.bar.update(self.tasks[name], completed=info["index"] + 1)


@app.command()
def quantize(
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
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or summary")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the run report as JSON")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Quantize MODEL_DIR into OUTPUT (a directory mlx_lm.load reads unchanged)."""
    from .api import quantize_directory
    from .recipe import Recipe

    start = time.perf_counter()
    try:
        base = Recipe.from_toml(recipe) if recipe else Recipe()
        if not recipe and strategy is None and bits is None and group_size is None:
            base = Recipe()  # GPTQ 4-bit, group 64
        rec = base.with_default(
            strategy=strategy.value if strategy else None, bits=bits, group_size=group_size
        )
        if num_samples < 1 or seq_len < 2 or batch_size < 1:
            fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
        plan = None
        if target_bpw is not None:
            from .mixed import plan_directory

            with _ProgressView(enabled=not (quiet or json_out)) as view:
                plan = plan_directory(
                    model_dir, target_bpw, rec, calibration=calibration, num_samples=num_samples,
                    seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                    progress=view,
                )
            rec = plan.recipe
        with _ProgressView(enabled=not (quiet or json_out)) as view:
            result = quantize_directory(
                model_dir, output, rec, calibration=calibration, num_samples=num_samples,
                seq_len=seq_len, seed=seed, dtype=dtype.value, batch_size=batch_size,
                overwrite=overwrite, progress=view,
            )
        if plan is not None:
            (result.out_dir / "recipe.toml").write_text(plan.to_toml())
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
        return
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
        return
    report = result.report
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
