"""How a whole decoder block is improved around the per-matrix solve.

A :class:`BlockTransform` runs on a block's float weights before its layers are calibrated and
solved (e.g. activation-aware scales folded into the preceding norm); a :class:`BlockOptimizer`
runs after the block's layers are quantized, with the float block's outputs as targets (e.g.
learned rounding). Both are registered by name so recipes and the CLI can use them.
"""

from .base import (
    OPTIMIZERS,
    TRANSFORMS,
    BlockContext,
    BlockOptimizer,
    BlockTransform,
    register_optimizer,
    register_transform,
)

__all__ = [
    "OPTIMIZERS", "TRANSFORMS", "BlockContext", "BlockOptimizer", "BlockTransform",
    "register_optimizer", "register_transform",
]

# The methods quantkit ships, registered by importing them.
from . import awq as _awq  # noqa: E402,F401
from . import rounding as _rounding  # noqa: E402,F401
