"""The typer app and what the commands share: the consoles (stdout for results, stderr for
progress, warnings and errors), the one error path (:func:`fail`), option types, the progress
bars of a walk, and ``main`` (the ``quantkit`` program)."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from .. import interrupt
from ..errors import describe
from .signals import force_exit

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


def strategy_names() -> list[str]:
    from ..strategies import STRATEGIES

    return sorted(STRATEGIES)


def load_plugin_args(plugins: list[str] | None) -> None:
    """Import the --plugin modules/files (their strategies and block methods register)."""
    from ..plugins import load_plugins

    load_plugins(plugins or [])


def check_strategy(strategy: str | None) -> None:
    """--strategy must name a registered strategy (checked once plugins are loaded)."""
    names = strategy_names()
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


class ProgressView:
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


def wide() -> Console:
    """stdout, wide enough for long layer paths even when piped (rich assumes 80 columns)."""
    return out if out.is_terminal else Console(width=max(out.width, 150))


def fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    """The ``quantkit`` program: signal handlers first (see :mod:`quantkit.interrupt`)."""
    interrupt.install(force_exit)
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
