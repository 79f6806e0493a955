"""A quantkit plugin: one strategy, one block transform and one block optimizer, registered by
name so that a recipe (``plugins = ["my_methods.py"]``) or the CLI (``--plugin FILE``) can use
them. Nothing else in quantkit changes.

- ``shrink_rtn`` (strategy): round to nearest; each group takes whichever of ``ratios`` (a
  list-valued option) of its range gives the least squared error.
- ``balance_columns`` (block transform): for each norm → linears group of the model's
  architecture table, evens out the targets' input columns and folds the inverse scale into the
  norm, so the block computes the same function.
- ``block_error`` (block optimizer): measures the quantized block against the float block's
  outputs (a starting point for learned rounding: it changes nothing).

    quantkit recipe check examples/plugin/recipe.toml
    quantkit quantize ../shared/models/stories260K -o /tmp/stories-plugin --recipe examples/plugin/recipe.toml
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import mlx.core as mx

from quantkit import Quantizer, QuantResult, register_strategy
from quantkit.blocks import (
    BlockContext,
    BlockOptimizer,
    BlockTransform,
    register_optimizer,
    register_transform,
)
from quantkit.kernels.rtn import affine_dequantize, affine_params_from_range, affine_quantize


@register_strategy
@attrs.frozen
class ShrinkRTN(Quantizer):
    name: ClassVar[str] = "shrink_rtn"
    needs_hessian: ClassVar[bool] = False
    rows_independent: ClassVar[bool] = True

    ratios: tuple[float, ...] = (1.0, 0.9, 0.8)  # recipe key: ratios = [1.0, 0.95, 0.9]

    def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
        groups = weight.reshape(*weight.shape[:-1], -1, spec.group_size)
        lo, hi = groups.min(axis=-1), groups.max(axis=-1)
        best = None
        for ratio in self.ratios:
            s, b = affine_params_from_range(lo * ratio, hi * ratio, spec.bits)
            s = s.astype(storage_dtype).astype(mx.float32)
            b = b.astype(storage_dtype).astype(mx.float32)
            codes = affine_quantize(weight, s, b, spec.bits)
            err = ((affine_dequantize(codes, s, b) - weight).reshape(groups.shape) ** 2).sum(-1)
            if best is None:
                best = (err, codes, s, b)
                continue
            better = err < best[0]
            per_value = mx.repeat(better, spec.group_size, axis=-1).reshape(weight.shape)
            best = (mx.minimum(err, best[0]), mx.where(per_value, codes, best[1]),
                    mx.where(better, s, best[2]), mx.where(better, b, best[3]))
        _, codes, scales, biases = best
        return QuantResult(spec=spec, dequantized=affine_dequantize(codes, scales, biases),
                           codes=codes, scales=scales, biases=biases, info={"ratios": len(self.ratios)})


@register_transform
@attrs.frozen
class BalanceColumns(BlockTransform):
    name: ClassVar[str] = "balance_columns"

    strength: float = attrs.field(default=0.5, validator=attrs.validators.ge(0.0))

    def apply(self, ctx: BlockContext) -> dict:
        modules = dict(ctx.block.named_modules())
        groups = [g for g in ctx.arch.scale_groups_in(set(modules)) if g.kind == "norm"]
        for g in groups:
            targets = [modules[t] for t in g.targets]
            col_max = mx.max(mx.stack([mx.abs(t.weight.astype(mx.float32)).reshape(
                -1, t.weight.shape[-1]).max(axis=0) for t in targets]), axis=0)
            col_max = mx.maximum(col_max, 1e-8)
            s = (mx.mean(col_max) / col_max) ** self.strength  # columns × s, the norm ÷ s
            norm = modules[g.source]
            norm.weight = ((norm.weight + g.offset) / s - g.offset).astype(norm.weight.dtype)
            for t in targets:
                t.weight = (t.weight * s).astype(t.weight.dtype)
        return {"groups": len(groups)}


@register_optimizer
@attrs.frozen
class BlockError(BlockOptimizer):
    name: ClassVar[str] = "block_error"

    def optimize(self, ctx: BlockContext, targets) -> dict:
        err = energy = 0.0
        for j, target in enumerate(targets):
            out = ctx.forward(ctx.block, j).astype(mx.float32)
            err += float(ctx.reduce(mx.sum((out - target) ** 2)).item())
            energy += float(ctx.reduce(mx.sum(target.astype(mx.float32) ** 2)).item())
        return {"relative_error": err / max(energy, 1e-30)}
