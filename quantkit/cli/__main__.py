"""``python -m quantkit.cli``: the ``quantkit`` program (the package's ``__init__`` has already
installed the signal handlers, before anything heavy was imported)."""

from . import main

main()
