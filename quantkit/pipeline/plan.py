"""What happens to one layer: the plan the walker makes for it before the walk, and the cost
estimate that spreads layers over processes."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn

from ..quantizers import Quantizer
from ..recipe import Rule
from ..registry import LayerHandler
from ..specs import QuantSpec


@attrs.define
class LayerPlan:
    path: str
    module: nn.Module
    handler: LayerHandler
    rule_index: int | None
    rule: Rule
    spec: QuantSpec
    quantizer: Quantizer
    storage_dtype: mx.Dtype
    note: str | None = None

    @property
    def needs_stats(self) -> bool:
        """Calibrated in the block's shared forward pass (expert layers have their own)."""
        return self.quantizer.needs_hessian and not self.handler.per_expert

    @property
    def per_expert(self) -> bool:
        """Calibrated one Hessian per expert, in expert-batch passes (see quantkit.moe)."""
        return self.quantizer.needs_hessian and self.handler.per_expert


def layer_cost(plan: LayerPlan) -> float:
    """Rough cost of quantizing one layer: GPTQ's column loop, ``out·in²`` per matrix, when it
    uses a Hessian (the ``in³`` factorization runs in LAPACK and weighs less); ``out·in``
    without (round to nearest)."""
    w = plan.handler.weight(plan.module)
    return float(w.size * w.shape[-1] if plan.needs_stats else w.size)
