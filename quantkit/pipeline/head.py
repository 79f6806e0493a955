"""The output head as one more stage for block optimizers.

After the decoder blocks, the output head (``lm_head``, or a tied embedding used through
``as_linear``) is solved like any layer outside the blocks. An optimizer that asks for it
(:class:`~quantkit.blocks.rounding.LearnedRounding` with ``head = true``) then tunes it as a
one-layer "block" whose outputs are logits: its inputs are the quantized model's final hidden
states (after the final norm), its targets the float head's logits on the float model's own
final hidden states where the run carries them (else on the same inputs), compared by KL
divergence. Logits are as wide as the vocabulary: targets are computed when asked for, a few
sequences at a time, never stored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class _Recorder:
    """Stands in for a Hessian collector: keeps what the head is given (evaluated)."""

    calls = itertools.count()

    def __init__(self) -> None:
        self.inputs: list[mx.array] = []
        self.last = -1

    def update(self, x: mx.array) -> None:
        mx.eval(x)
        self.inputs.append(x)
        self.last = next(self.calls)


def head_inputs(model: nn.Module, candidates: dict[str, tuple[nn.Module, Callable]],
                run: Callable[[int], mx.array], n_batches: int) -> tuple[str, list[mx.array]] | None:
    """``(path, inputs per batch)`` of the output head: of ``candidates`` (path → (module,
    catcher factory)) the one called last with hidden states in a forward pass ``run(j)``
    (whose logits are never evaluated). ``None`` when none of them reads hidden states."""
    recorders = {k: _Recorder() for k in candidates}
    model.update_modules(tree_unflatten([(k, make(m, recorders[k])) for k, (m, make) in candidates.items()]))
    try:
        for j in range(n_batches):
            run(j)
    finally:
        model.update_modules(tree_unflatten([(k, m) for k, (m, _) in candidates.items()]))
    called = [k for k, r in recorders.items() if len(r.inputs) == n_batches]
    if not called:
        return None
    path = max(called, key=lambda k: recorders[k].last)
    return path, recorders[path].inputs


def regroup(batches: Sequence[mx.array], size: int) -> list[mx.array]:
    """The sequences of ``batches`` (``(n, length, hidden)`` each) in batches of ``size``."""
    out: list[mx.array] = []
    for x in batches:
        out.extend(x[r : r + size] for r in range(0, x.shape[0], size))
    return out


class Head(nn.Module):
    """The output head as a block: ``x → head(x)`` with one quantized linear ``head``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(x)


def as_linear_pair(float_module: nn.Module, quantized: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(float linear, quantized linear)`` computing the head's logits: the modules themselves
    for an ``lm_head``; for a tied embedding, linears holding its arrays (``None`` for a layer
    this stage cannot tune: not affine, or of another kind)."""
    if getattr(quantized, "mode", "affine") != "affine":
        return None
    if isinstance(quantized, nn.QuantizedLinear) and isinstance(float_module, nn.Linear):
        return float_module, quantized
    if isinstance(quantized, nn.QuantizedEmbedding) and isinstance(float_module, nn.Embedding):
        vocab, hidden = float_module.weight.shape
        flt = nn.Linear(hidden, vocab, bias=False)
        flt.weight = float_module.weight
        q = nn.QuantizedLinear(hidden, vocab, bias=False, group_size=quantized.group_size,
                               bits=quantized.bits)
        q.weight, q.scales, q.biases = quantized.weight, quantized.scales, quantized.biases
        return flt, q
    return None


def write_back(quantized: nn.Module, linear: nn.Module) -> None:
    """Copy a tuned head linear's arrays into the model's head (a no-op for the same module)."""
    if quantized is not linear:
        quantized.weight, quantized.scales, quantized.biases = linear.weight, linear.scales, linear.biases


class FloatLogits(Sequence):
    """``targets[j]``: the float head's logits on hidden states ``inputs[j]``, computed when
    asked for (lazy: a caller evaluates only what it uses)."""

    def __init__(self, head: nn.Module, inputs: Sequence[mx.array]) -> None:
        self.head, self.inputs = head, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[k] for k in range(len(self))[j]]
        return self.head(self.inputs[j].astype(mx.float32))


__all__ = ["FloatLogits", "Head", "as_linear_pair", "head_inputs", "regroup",
           "write_back"]
