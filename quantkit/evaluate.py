"""Perplexity of a language model on token windows."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from .errors import EvaluationError
from .interrupt import check


def perplexity(
    model: nn.Module, tokens: mx.array, batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``tokens (n, seq_len)``."""
    total, count = 0.0, 0
    n = tokens.shape[0]
    for i in range(0, n, batch_size):
        check("eval")  # a place to stop at every batch (quantkit.interrupt)
        batch = tokens[i : i + batch_size]
        logits = model(batch[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")
        mx.eval(nll)
        total += cast(float, nll.item())
        count += batch[:, 1:].size
        if progress is not None:
            progress(min(i + batch_size, n), n)
    loss = total / count
    if not math.isfinite(loss) or loss > math.log(sys.float_info.max):
        raise EvaluationError(
            f"the mean loss is {loss:.4g} nats per token, so the perplexity is "
            f"{'not a number' if math.isnan(loss) else 'too large to represent'}: the model's "
            "outputs are broken (damaged weights or a failed quantization); check it with a "
            "full-precision run")
    return math.exp(loss)
