"""Every expert calibrated: statistics from every token, outputs from the model's own routing.

A router sends each token to ``top_k`` of a layer's experts; rarely picked experts get few or
no calibration tokens, and :mod:`quantkit.pipeline.expert_layers` quantizes those "starved" experts without a
Hessian. With ``SwitchLinearHandler(calibrate_all_experts=True)`` (CLI
``--moe-calibrate-all-experts``) each expert's Hessian is collected from *all* calibration
tokens instead. llm-compressor's ``moe_calibrate_all_experts`` and GPTQModel's
``ExpertsRoutingOverride``/``ExpertsRoutingBypass`` do the same with their PyTorch MoE blocks:
every expert runs on every token for the statistics, and the block's output is the one the
router's top-k choice gives.

Here the experts module (mlx-lm's ``SwitchGLU`` or ``SwitchMLP``, whose ``SwitchLinear``
projections hold every expert) is wrapped, during an expert batch's calibration pass only, by
:class:`AllExpertsCalibration`. Each call runs the experts module twice:

1. with ``indices`` naming every expert of the current expert batch for every token: its
   projections' catchers collect statistics (gate/up see the token, down sees each expert's own
   hidden units for it). The output of this call is never used, so MLX never computes it;
2. with the router's own ``indices``: the catchers only count the routed rows
   (``routed_rows`` in the report), and this output is returned, so the block output that
   feeds the rest of the block is the model's own.

Memory: the first call holds, per expert batch, ``tokens · expert_batch_size`` rows of the
experts' inputs and hidden units (instead of ``tokens · top_k``); lower
``expert_batch_size`` to bound it. Time: the experts of a layer run on ``experts / top_k``
times more rows than routed calibration does (measured in ``benchmarks/moe_all_experts.py``).
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear, SwitchMLP

from .errors import RecipeError
from .registry import (
    DEFAULT_REGISTRY,
    LayerRegistry,
    SwitchLinearCatcher,
    SwitchLinearHandler,
    Wrapper,
)

#: Experts modules whose projections are all ``SwitchLinear`` called as ``proj(x, indices)``.
EXPERT_MODULES = (SwitchGLU, SwitchMLP)


class AllExpertsCalibration(Wrapper):
    """Stands in for an experts module while its projections' statistics are collected (see
    the module docstring); returns exactly what the wrapped module returns."""

    def __init__(self, module: nn.Module, path: str = "") -> None:
        if type(module) not in EXPERT_MODULES:
            raise RecipeError(
                f"calibrate_all_experts: {path} is a {type(module).__name__}; only mlx-lm "
                "SwitchGLU and SwitchMLP experts can be calibrated on every token")
        super().__init__(module)

    def _catchers(self) -> list[SwitchLinearCatcher]:
        return [m for _, m in self.module.children().items() if isinstance(m, SwitchLinearCatcher)]

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        catchers = self._catchers()
        if not catchers:
            return self.module(x, indices)
        batch = catchers[0].collector.experts
        every = mx.broadcast_to(mx.arange(batch.start, batch.stop, dtype=indices.dtype),
                                (*indices.shape[:-1], len(batch)))
        self.module(x, every)  # statistics only: the result is not used, MLX never computes it
        for c in catchers:
            c.routed_only = True
        try:
            return self.module(x, indices)
        finally:
            for c in catchers:
                c.routed_only = False


def experts_parents(model: nn.Module, paths: list[str]) -> list[tuple[str, nn.Module]]:
    """The experts modules (path, module) holding the layers at ``paths``, once each."""
    modules = dict(model.named_modules())
    parents = sorted({p.rpartition(".")[0] for p in paths})
    return [(k, modules[k]) for k in parents]


def with_all_experts(registry: LayerRegistry = DEFAULT_REGISTRY) -> LayerRegistry:
    """A copy of ``registry`` whose ``SwitchLinear`` handler calibrates every expert on every
    token (its other settings kept)."""
    handler = registry.handler(SwitchLinear)
    out = registry.copy()
    base = handler if isinstance(handler, SwitchLinearHandler) else SwitchLinearHandler()
    out.register(SwitchLinear, attrs.evolve(base, calibrate_all_experts=True))
    return out
