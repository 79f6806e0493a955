"""The strategy registry with every built-in strategy registered: ``gptq`` and ``rtn``
(:mod:`quantkit.quantizers`) and ``gptaq`` (:mod:`quantkit.gptaq`, which imports
``quantizers``, so ``quantizers`` cannot import it). Code that looks names up in the registry
imports it from here; ``import quantkit`` imports its public names only on first use, so the
registry must not depend on which modules happen to have been imported."""

from . import gptaq as _gptaq  # noqa: F401  (registers "gptaq")
from .quantizers import STRATEGIES, register_strategy

__all__ = ["STRATEGIES", "register_strategy"]
