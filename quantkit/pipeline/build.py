"""The one place quantized layers are made: a solver's :class:`~quantkit.quantizers.QuantResult`
→ the arrays MLX stores (:func:`pack`) → the quantized MLX layer holding them (:func:`build`).

Every path that ends in a quantized layer comes through here: a dense layer solved in this
process (a slice of rows at a time, :func:`join_rows`), a MoE layer's experts
(:func:`stack_experts`), a layer another process solved (:func:`from_parameters`), a finished
block's layers read back from its file on ``--resume`` (:func:`from_file`). The layer class's
own knowledge (which ``to_quantized`` to call) stays with its handler
(:meth:`~quantkit.registry.LayerHandler.build`); :func:`dense_standin` is the dense copy a
quantized layer is run as while its block computes the next block's inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..errors import CheckpointError
from ..host import HostLinear, runs_on_host
from ..packers import packer_for
from ..quantizers import QuantResult
from ..specs import QuantSpec
from .plan import LayerPlan


def pack_dtype(spec: QuantSpec, storage_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype scales and biases are packed in during the walk: float32 for affine (exact: the
    solver rounded them to ``storage_dtype`` already; the output's dtypes are restored when it
    is written), the storage dtype for MLX's float formats."""
    return mx.float32 if spec.mode == "affine" else storage_dtype


def pack(result: QuantResult, spec: QuantSpec, storage_dtype: mx.Dtype) -> dict[str, mx.array]:
    """``result``'s stored arrays (``weight``, ``scales``[, ``biases``]), evaluated, so that the
    result itself can be dropped."""
    arrays = packer_for(spec.mode).pack(result, pack_dtype(spec, storage_dtype))
    mx.eval(arrays)
    return arrays


def join_rows(parts: list[dict[str, mx.array]]) -> dict[str, mx.array]:
    """Packed slices of output rows (in order) as one layer's arrays."""
    if len(parts) == 1:
        return parts[0]
    return {k: mx.concatenate([q[k] for q in parts]) for k in parts[0]}


def stack_experts(experts: list[dict[str, mx.array]]) -> dict[str, mx.array]:
    """Per-expert arrays ``(out, ·)`` as the layer's ``(experts, out, ·)`` arrays."""
    return {k: mx.stack([d[k] for d in experts]) for k in experts[0]}


def build(p: LayerPlan, packed: dict[str, mx.array],
          nested: Iterable[tuple[str, mx.array]] = ()) -> nn.Module:
    """The quantized layer of plan ``p`` holding the ``packed`` arrays (made by its handler from
    the original layer), with ``nested`` parameters (``"name.leaf"``, e.g. a layer's own
    sub-modules) put in too; evaluated."""
    module = p.handler.build(p.module, packed, p.spec)
    nested = list(nested)
    if nested:
        module.update(tree_unflatten(nested))
    mx.eval(module.parameters())
    return module


def from_parameters(p: LayerPlan, params: list[tuple[str, mx.array]]) -> nn.Module:
    """Plan ``p``'s quantized layer from its flattened parameters (as another process sent
    them)."""
    return build(p, {k: v for k, v in params if "." not in k},
                 [(k, v) for k, v in params if "." in k])


def from_file(plans: list[LayerPlan], path: Path | str) -> list[tuple[str, nn.Module]]:
    """The quantized layers of ``plans`` rebuilt from a finished block's file, their scales and
    biases in the dtype the walk packs them in (:func:`pack_dtype`; exact for affine: the stored
    values were rounded to the stored dtype when they were computed)."""
    arrays = cast(dict[str, mx.array], mx.load(str(path)))
    out = []
    for p in plans:
        dtype = pack_dtype(p.spec, p.storage_dtype)
        packed = {}
        for key in ("weight", "scales", "biases"):
            value = arrays.get(f"{p.path}.{key}")
            if value is None:
                continue
            if key != "weight" and value.dtype != mx.uint8 and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            packed[key] = value
        if "scales" not in packed:
            raise CheckpointError(f"checkpoint file {path} does not hold the quantized layer {p.path}")
        out.append((p.path, p.handler.build(p.module, packed, p.spec)))
    return out


def dense_standin(original: nn.Module, quantized: nn.Module, host: bool = False) -> nn.Module:
    """A copy of ``original`` holding the weights ``quantized`` computes with (dequantized);
    ``original`` itself is left as it was (and not referenced, so it can be freed). ``host``: run
    by a :class:`HostLinear` where it can be."""
    w = mx.dequantize(
        quantized["weight"], quantized["scales"], quantized.get("biases"),
        group_size=quantized.group_size, bits=quantized.bits, mode=quantized.mode,
    )
    standin = copy.copy(original)
    standin.weight = w.astype(original.weight.dtype)
    mx.eval(standin.weight)
    return HostLinear(standin) if host and runs_on_host(standin) else standin
