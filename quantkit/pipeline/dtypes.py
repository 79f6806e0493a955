"""The dtypes a walk calibrates in, by name, and giving a model its parameters' dtypes back."""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

#: ``--dtype`` names → MLX dtypes.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def restore_dtypes(model: nn.Module, orig: dict[str, mx.Dtype]) -> None:
    """Give every parameter back its original dtype; scales/biases of quantized layers take the
    dtype of the weight they replace."""
    updates = []
    params = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    for path, value in params:
        base, _, leaf = path.rpartition(".")
        target = orig.get(path)
        if leaf in ("scales", "biases") and value.dtype != mx.uint8:
            target = orig.get(f"{base}.weight", target)
        if target is not None and value.dtype != target and mx.issubdtype(value.dtype, mx.floating):
            updates.append((path, value.astype(target)))
    if updates:
        model.update(tree_unflatten(updates))
