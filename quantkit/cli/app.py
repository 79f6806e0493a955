"""The typer app and what the commands share: the consoles (stdout for results, stderr for
progress, warnings and errors), the one error path (:func:`fail`), option types, the progress
bars of a walk, and ``main`` (the ``quantkit`` program)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import interrupt
from ..errors import QuantkitError, describe
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


def progress_bar(disable: bool):
    """The commands' progress bar on stderr (rich; gone when done)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=err, transient=True, disable=disable)


class ProgressView:
    """Renders walker progress events as rich progress bars on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = progress_bar(disable=not enabled)
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
        if event in ("capture", "block", "distill"):
            name = {"capture": "capturing inputs", "block": "quantizing blocks",
                    "distill": "distilling"}[event]
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=info["total"])
            self.bar.update(self.tasks[name], completed=info["index"] + 1)


#: The options of the commands that measure models on windows of a text (eval, compare).
TextOption = Annotated[Optional[Path], typer.Option(help="plain-text file to measure on (default: offline built-in text)")]
SeqLenOption = Annotated[int, typer.Option(help="tokens per sequence")]
NumSamplesOption = Annotated[int, typer.Option(help="sequences to measure")]
SeedOption = Annotated[int, typer.Option(help="seed for choosing the windows of the text")]
BatchSizeOption = Annotated[int, typer.Option(help="sequences per forward pass")]
DebugOption = Annotated[bool, typer.Option(help="show full tracebacks")]


def check_windows(num_samples: int, seq_len: int, batch_size: int, seed: int,
                  text: Path | None) -> None:
    """The window options of a measuring command and its text file, before any work."""
    from ..errors import SettingsError
    from ..validate import check_input_file, check_settings

    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        fail("--num-samples and --batch-size must be ≥ 1 and --seq-len ≥ 2", 2)
    try:
        check_settings(seed=seed)
        if text is not None:
            check_input_file(text, "text file")
    except QuantkitError as exc:
        fail(str(exc), 2 if isinstance(exc, SettingsError) else 1)


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """How an interruption is told: the signal's own words when it carries them."""
    return f"interrupted ({exc})" if isinstance(exc, interrupt.Interrupted) else "interrupted"


@contextmanager
def reported(debug: bool, on_interrupt: Callable[[KeyboardInterrupt], str] = interrupted_line,
             ) -> Iterator[None]:
    """The one error path of a command's work: bad input → its one line (exit 1), Ctrl-C or a
    stop signal → ``on_interrupt``'s line (exit 130/143), anything else is a bug → one line
    (exit 3); ``debug`` re-raises all of them for the traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except QuantkitError as exc:
        if debug:
            raise
        fail(str(exc))
    except KeyboardInterrupt as exc:
        if debug:
            raise
        fail(on_interrupt(exc), getattr(exc, "exit_code", 130))
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        internal_error(exc)


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
