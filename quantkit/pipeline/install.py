"""Install: put a block's quantized layers into the model.

While a block still has to compute the next block's inputs, its quantized layers may run as
dense stand-ins holding their dequantized weights (:class:`StandIns`, made by
:func:`~.build.dense_standin`), swapped for the quantized layers once the block has run for
the last time. :func:`release_float` frees a float layer's weight as soon as its quantized
layer is made, while the rest of its block is solved.
"""

from __future__ import annotations

import copy

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import build
from .activations import ParkedLayers
from .plan import LayerPlan


@attrs.define
class StandIns:
    """Installs quantized layers; with ``on``, as dense stand-ins (NumPy-run where ``host``)
    until :meth:`swap` puts the quantized layers in their place. One object per walk: it holds
    the quantized layers of the block being walked, at most one block's."""

    on: bool = False
    host: bool = False
    _waiting: list[tuple[str, nn.Module]] = attrs.field(factory=list, repr=False)

    def install(self, model: nn.Module, plans: list[LayerPlan],
                new_modules: list[tuple[str, nn.Module]]) -> None:
        """Put ``new_modules`` (path, quantized layer) in place: with stand-ins, copies of the
        original layers of ``plans`` holding the dequantized weights."""
        installed = new_modules
        if self.on:
            self._waiting.extend(new_modules)
            by_path = {p.path: p for p in plans}
            installed = [(k, build.dense_standin(by_path[k].module, m, self.host))
                         for k, m in new_modules]
        if installed:
            model.update_modules(tree_unflatten(installed))

    def swap(self, model: nn.Module) -> None:
        """Replace the dense stand-ins installed so far by the quantized layers they stand for."""
        if self._waiting:
            model.update_modules(tree_unflatten(self._waiting))
            self._waiting.clear()


def release_float(model: nn.Module, p: LayerPlan, quantized: nn.Module,
                  parked: ParkedLayers | None = None) -> None:
    """Free a quantized layer's float weight while the rest of its block is solved: the model
    gets the quantized layer now, and the plan keeps a shell of the original whose weight is a
    lazy placeholder of the same shape and dtype, never computed (:func:`.build.dense_standin`
    makes the stand-in from the shell). No forward pass runs until :meth:`StandIns.install`.
    With ``parked``, the weight is put aside there first (for the block optimizers), under the
    layer's path in its block."""
    if parked is not None:
        p.module = parked.park(p.path, p.module)
    else:
        shell = copy.copy(p.module)
        weight = shell.weight
        shell.weight = mx.zeros(weight.shape, weight.dtype)
        p.module = shell
    model.update_modules(tree_unflatten([(p.path, quantized)]))
