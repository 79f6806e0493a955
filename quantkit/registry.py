"""One registry: exact layer class → the handler that knows how to calibrate and rebuild it."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .hessian import DenseHessianCollector, HessianCollector, PerExpertHessianCollector
from .quantizers import Quantizer, RTNQuantizer
from .specs import QuantSpec


class Wrapper(nn.Module):
    """A module standing in for ``module``: attributes it lacks are read from ``module``, so model
    code that inspects its layers (``layer.use_sliding``, ``proj.weight``) keeps working."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __getattr__(self, key: str):
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "module" not in self:
                raise
            return getattr(self["module"], key)


class LinearCatcher(Wrapper):
    """Wraps a layer during calibration: feeds each input to the collector, then runs the layer."""

    def __init__(self, module: nn.Module, collector: HessianCollector) -> None:
        super().__init__(module)
        self.collector = collector

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        self.collector.update(x)
        return self.module(x, *args, **kwargs)


class SwitchLinearCatcher(Wrapper):
    """Wraps an expert layer during calibration: feeds each input and its expert ``indices`` to
    the collector, then runs the layer."""

    def __init__(self, module: nn.Module, collector: PerExpertHessianCollector) -> None:
        super().__init__(module)
        self.collector = collector
        self.routed_only = False  # set by AllExpertsCalibration: count the rows, no statistics

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self.routed_only:
            self.collector.count_routed(x, indices)
        else:
            self.collector.update(x, indices)
        return self.module(x, indices, sorted_indices=sorted_indices)


class EmbeddingCatcher(Wrapper):
    """Wraps an embedding: lookups pass through; ``as_linear`` (a tied output head) is collected."""

    def __init__(self, module: nn.Embedding, collector: HessianCollector) -> None:
        super().__init__(module)
        self.collector = collector

    def __call__(self, x: mx.array) -> mx.array:
        return self.module(x)

    def as_linear(self, x: mx.array) -> mx.array:
        self.collector.update(x)
        return self.module.as_linear(x)


class LayerHandler(abc.ABC):
    """How the walker treats one layer class: its weight, its calibration wrapper, its rebuild."""

    #: Whether the layer holds experts calibrated one Hessian per expert (see quantkit.pipeline.expert_layers).
    per_expert: ClassVar[bool] = False

    def weight(self, module: nn.Module) -> mx.array:
        """The weight with the input dimension last."""
        return module.weight

    def collector(self, module: nn.Module) -> HessianCollector:
        return DenseHessianCollector(self.weight(module).shape[-1])

    def adapt(self, quantizer: Quantizer) -> Quantizer:
        """The quantizer this layer class is solved with, given the recipe's (itself, unless
        the handler knows better for its class)."""
        return quantizer

    @abc.abstractmethod
    def catcher(self, module: nn.Module, collector: HessianCollector) -> nn.Module:
        """A module that stands in for ``module`` during calibration and feeds ``collector``."""

    def build(self, module: nn.Module, packed: dict[str, mx.array], spec: QuantSpec) -> nn.Module:
        """The quantized layer holding ``packed`` arrays, made by the layer's ``to_quantized``."""
        q = module.to_quantized(**spec.to_config())
        for key, value in packed.items():
            setattr(q, key, value)
        if spec.mode != "affine" and "biases" in q and "biases" not in packed:
            del q["biases"]
        return q


class LinearHandler(LayerHandler):
    def catcher(self, module, collector):
        return LinearCatcher(module, collector)


@attrs.frozen
class EmbeddingHandler(LayerHandler):
    """Embeddings: lookups carry no activations; only a tied output head gives a Hessian.

    ``tied_damping``: the damping a Hessian strategy (GPTQ's ``damping``) uses for a tied
    embedding instead of the recipe's (``None``: the recipe's). Its Hessian comes from the
    matrix's use as the output head only; a larger identity term in the damped Hessian weighs
    the plain weight error more, which measured better on every model in
    docs/results-quality.md (as a regulariser, not for the rows' input use: damping rows by
    their tokens' counts did worse)."""

    tied_damping: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0.0)))

    def catcher(self, module, collector):
        return EmbeddingCatcher(module, collector)

    def adapt(self, quantizer: Quantizer) -> Quantizer:
        if self.tied_damping is None or not attrs.has(type(quantizer)):
            return quantizer
        options: Any = quantizer  # an attrs class: its fields can be evolved
        if "damping" not in attrs.fields_dict(type(options)):
            return quantizer
        return cast(Quantizer, attrs.evolve(options, damping=self.tied_damping))


@attrs.frozen
class SwitchLinearHandler(LayerHandler):
    """Mixture-of-experts linear (weight ``(experts, out, in)``): one Hessian per expert.

    ``expert_batch_size``: experts whose Hessians are collected and solved together; the block's
    calibration forward runs once per batch, so memory holds ``expert_batch_size`` Hessians per
    expert layer instead of all of them (see :mod:`quantkit.pipeline.expert_layers`). ``min_token_share``: an expert
    sent less than this fraction of the calibration tokens (or none) is "starved" and quantized
    with ``starved`` (a calibration-free strategy) instead of the recipe's; the default, 0.5%,
    is GPTQModel's.
    ``shared_hessian``: use one Hessian over all experts' rows, as mlx-lm's GPTQ does (for
    comparison; wrong for experts that see different tokens).
    ``calibrate_all_experts``: collect each expert's Hessian from *every* calibration token
    sent through it (statistics only), while the block's output still follows the model's own
    top-k routing, so no expert is starved (llm-compressor's ``moe_calibrate_all_experts``; see
    :mod:`quantkit.experts`). Costs one extra pass of each expert batch's experts over all
    tokens.
    """

    per_expert: ClassVar[bool] = True

    expert_batch_size: int = attrs.field(default=32, validator=attrs.validators.gt(0))
    min_token_share: float = attrs.field(default=0.005, validator=attrs.validators.ge(0.0))
    starved: Quantizer = attrs.field(factory=RTNQuantizer)
    shared_hessian: bool = False
    calibrate_all_experts: bool = False
    #: λ of :func:`quantkit.kernels.shrink.shrink`: each expert's Hessian is blended with the
    #: layer's Hessian over all routed rows, ``(n_e H_e + λ H) / (n_e + λ)``; 0: off.
    hessian_shrinkage: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))

    def num_experts(self, module: nn.Module) -> int:
        return self.weight(module).shape[0]

    def expert_batches(self, module: nn.Module) -> list[range]:
        n = self.num_experts(module)
        step = self.expert_batch_size
        return [range(e, min(e + step, n)) for e in range(0, n, step)]

    def collector(self, module, experts: range | None = None):
        w = self.weight(module)
        return PerExpertHessianCollector(w.shape[-1], w.shape[0], experts, self.shared_hessian,
                                         self.calibrate_all_experts, self.hessian_shrinkage)

    def catcher(self, module, collector):
        return SwitchLinearCatcher(module, collector)


class LayerRegistry:
    """Maps an exact layer class to its handler. No ``isinstance`` chains: a subclass of a
    registered class is its own class and must be registered to take part."""

    def __init__(self, handlers: dict[type, LayerHandler] | None = None) -> None:
        self._handlers: dict[type, LayerHandler] = dict(handlers or {})

    def register(self, cls: type, handler: LayerHandler) -> None:
        self._handlers[cls] = handler

    def get(self, module: nn.Module) -> LayerHandler | None:
        return self._handlers.get(type(module))

    def handler(self, cls: type) -> LayerHandler | None:
        """The handler registered for exactly ``cls``."""
        return self._handlers.get(cls)

    def __contains__(self, cls: type) -> bool:
        return cls in self._handlers

    def copy(self) -> LayerRegistry:
        return LayerRegistry(self._handlers)


DEFAULT_REGISTRY = LayerRegistry(
    {
        nn.Linear: LinearHandler(),
        nn.Embedding: EmbeddingHandler(),
        SwitchLinear: SwitchLinearHandler(),
    }
)
