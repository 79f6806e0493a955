"""What the command line does on a second Ctrl-C; imports nothing heavy, so that the handlers
can be installed before typer, rich, MLX or mlx-lm are imported (see :mod:`quantkit.cli`)."""

from __future__ import annotations

import os


def force_exit(signum: int) -> None:
    """A second Ctrl-C: end now (a half-written hidden directory is removed by the next run)."""
    os.write(2, b"error: interrupted again; stopped at once\n")
    os._exit(128 + signum)
