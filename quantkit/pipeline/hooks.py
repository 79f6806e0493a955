"""How code outside the pipeline follows a walk: the ``progress(event, info)`` callback (the
CLI's bars) and :class:`WalkHook` (code that needs the layers themselves, e.g. the
mixed-precision profiler of :mod:`quantkit.mixed`), passed as ``ModelWalker(hooks=...)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hessian import HessianStats
from .plan import LayerPlan

#: ``progress(event, info)``: called at every capture batch, block, layer, transform,
#: optimizer and on resume (see :class:`~quantkit.walker.ModelWalker`).
Progress = Callable[[str, dict[str, Any]], None]


class WalkHook:
    """Sees each layer of a walk: its plan once the model is planned, and the layer with its
    calibration statistics just before it is solved. Override what you need; both do nothing
    by default. A hook may change a plan (e.g. its ``quantizer``) in :meth:`planned`; it must
    not change the model.

    ``keeps_float_layers``: whether the hook reads a plan's float layer (``plan.module``) after
    that layer is solved; while any hook does, the walker keeps every float layer to the end
    of the walk. Set it false to let the walker free each float layer once it is quantized, as
    a walk without hooks does (the plan then keeps a shell of the layer: its weight has the
    original shape and dtype, but no values)."""

    keeps_float_layers: bool = True

    def planned(self, plans: dict[str, LayerPlan]) -> None:
        """Called with every layer's plan (keyed by path) when the walker has planned a model."""

    def before_solve(self, plan: LayerPlan, stats: HessianStats | None) -> None:
        """Called before the dense layer of ``plan`` is solved, with its statistics (``None``
        without calibration)."""
