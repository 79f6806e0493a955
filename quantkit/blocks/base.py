"""The two block-level extension points and their name registries.

The pipeline calls, for decoder block ``i``::

    for t in transforms:  t.apply(ctx)                 # float weights, same function
    ... collect statistics, solve and pack every layer of the block ...
    for o in optimizers:  o.optimize(ctx, targets)     # quantized layers, float targets

``ctx`` is a :class:`BlockContext`. Both classes are frozen attrs configurations (their options
are recipe keys); the work happens in their one abstract method. Register a subclass with
:func:`register_transform` / :func:`register_optimizer`; a name that is already taken is an
error, never a silent replacement.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
import mlx.core as mx
import mlx.nn as nn

from ..arch import ArchSpec
from ..errors import RecipeError
from ..specs import QuantSpec


@attrs.frozen
class BlockContext:
    """What a block-level method sees of one decoder block.

    ``block``: the decoder block itself (modify it in place; ``update_modules`` to swap layers).
    ``inputs``: this process's calibration inputs of the block, one array per batch; valid
    while the method runs (on a CPU they are read from scratch files removed once the block
    is done: copy what you keep).
    ``forward(module, j)``: run ``module`` (the block, or a copy of it) on batch ``j`` with the
    extra arguments the model passes it (masks, caches), returning its output.
    ``arch``: the model family's table (norm→linear mappings, shared inputs).
    ``reduce(x)``: the sum of ``x`` over every process of the run (``x`` itself in one process);
    anything a method decides from statistics must go through it so all ranks decide alike.
    ``float_layers``: the block's float layers before the solve, by path relative to the block
    (given to optimizers; empty for transforms); like ``inputs``, valid while the method runs
    (on a CPU each access reads the layer's weight back from a scratch file).
    ``spec``: the run's default quantization (the recipe default's spec), for methods that
    round as the solve will (e.g. AWQ's search); ``None`` where there is no recipe.
    ``objective``: how an optimizer compares the outputs with their targets: ``"mse"`` (hidden
    states of a decoder block) or ``"kl"`` (logits: the output head, see
    :class:`~quantkit.blocks.rounding.LearnedRounding`'s ``head``).
    ``store(arrays=())``: a new sequence to keep block-sized arrays in between uses (a list;
    on a CPU, scratch files under ``TMPDIR`` read back, the same bytes, on each access — see
    :mod:`quantkit.pipeline.activations` — so that what a method keeps aside is not resident).
    """

    index: int
    path: str
    block: nn.Module
    inputs: Sequence[mx.array]
    forward: Callable[[nn.Module, int], mx.array]
    arch: ArchSpec
    reduce: Callable[[mx.array], mx.array] = attrs.field(default=lambda x: x)
    float_layers: Mapping[str, nn.Module] = attrs.field(factory=dict)
    seed: int = 0
    spec: QuantSpec | None = None
    objective: str = attrs.field(default="mse", validator=attrs.validators.in_(("mse", "kl")))
    store: Callable[..., MutableSequence[mx.array]] = list


class BlockTransform(abc.ABC):
    """Changes a block's float weights before its layers are solved, so that the block computes
    the same function (up to float rounding) but quantizes better."""

    name: ClassVar[str]

    @abc.abstractmethod
    def apply(self, ctx: BlockContext) -> dict[str, Any]:
        """Transform ``ctx.block`` in place; return figures for the run report (JSON-able)."""


class BlockOptimizer(abc.ABC):
    """Adjusts a block's quantized parameters after the solve, staying in MLX's storage format
    (``mlx_lm.load`` must read the result unchanged)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def optimize(self, ctx: BlockContext, targets: Sequence[mx.array]) -> dict[str, Any]:
        """``targets[j]``: the float block's output on batch ``j`` (valid while the method
        runs, as ``ctx.inputs``). Adjust ``ctx.block``'s quantized layers in place; return
        figures for the run report (JSON-able)."""


TRANSFORMS: dict[str, type[BlockTransform]] = {}
OPTIMIZERS: dict[str, type[BlockOptimizer]] = {}

_T = TypeVar("_T", bound=type)


def _register(table: dict[str, Any], kind: str, cls: _T) -> _T:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{kind} class {cls.__name__} has no `name`; set name = \"...\" on it")
    if name in table and table[name] is not cls:
        raise RecipeError(f"{kind} name {name!r} is already registered by "
                          f"{table[name].__module__}.{table[name].__qualname__}; choose another name")
    table[name] = cls
    return cls


def register_transform(cls: _T) -> _T:
    """Class decorator: make a :class:`BlockTransform` usable by name."""
    return _register(TRANSFORMS, "block transform", cls)


def register_optimizer(cls: _T) -> _T:
    """Class decorator: make a :class:`BlockOptimizer` usable by name."""
    return _register(OPTIMIZERS, "block optimizer", cls)
