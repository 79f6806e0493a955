"""The ``quantkit`` command line: the only place that prints. One module per command
(:mod:`.quantize`, :mod:`.inspect`, :mod:`.eval`, :mod:`.compare`, :mod:`.report`,
:mod:`.recipe`); :mod:`.app` holds the typer app, the consoles, the one error path (``fail``)
and what several commands share. Each command parses its options, calls the library and
renders the result.

Exit codes: 0 success; 1 a clear error about the input, the output path or a checkpoint (one
line on stderr); 2 usage error; 3 an unexpected internal error (one line; ``--debug`` shows the
traceback); 4 ``recipe check --strict`` found a rule that matches no layer (or
only layers an earlier rule took); 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM (the
finished blocks are checkpointed, ``--resume`` goes on). With ``--processes N`` the launcher
exits 1 when any rank fails, naming it.

Signals (see quantkit.interrupt and docs/reliability.md): when this package is the program
(``quantkit``, ``python -m quantkit.cli``), its first statements install handlers that only
set a flag, before typer, rich, MLX or mlx-lm are imported; the library stops at its next
check and the command ends with one line.
"""

import os
import sys

from .. import interrupt
from .signals import force_exit

# ``python -m quantkit.cli`` imports this package while ``sys.argv[0]`` is still "-m".
if sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "quantkit":
    interrupt.install(force_exit)  # the `quantkit` program: before the imports below
    # mlx-lm's package __init__ (and with it transformers) runs only if a command needs it
    from .. import mlxlm

    mlxlm.defer_package_init()

# ruff: noqa: E402 (the imports below come after the signal handlers, on purpose)
# The commands register themselves on ``app``, in the order ``quantkit --help`` lists them.
# isort: off
from . import quantize as _quantize_command
from . import inspect as _inspect_command
from . import eval as _eval_command
from . import compare as _compare_command
from . import report as _report_command
from . import recipe as _recipe_command
# isort: on
from .app import app, main
from .quantize import _give_up, _rank_argv

__all__ = ["app", "main", "_give_up", "_rank_argv"]
_COMMANDS = (_quantize_command, _inspect_command, _eval_command, _compare_command,
             _report_command, _recipe_command)
