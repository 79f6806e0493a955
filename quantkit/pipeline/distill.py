"""Distillation: after the walk, the quantized model's scales and biases are tuned end to end so
that its next-token distributions match the float model's on the calibration sequences.

The block methods (:mod:`quantkit.blocks`) each match one block's outputs; what they leave is
the error the blocks add up to, and the output head, which no block method sees. This stage
minimises the mean per-token KL divergence KL(float ‖ quantized) of the whole model, as mlx-lm's
DWQ (``mlx_lm/quant/dwq.py``) and EfficientQAT's end-to-end step do: Adam on every affine
``QuantizedLinear``'s and ``QuantizedEmbedding``'s ``scales`` and ``biases`` (a tied embedding
once, for both its uses; expert layers, ``QuantizedSwitchLinear``, are left as they are), the
integer codes fixed, so the output keeps MLX's storage format and ``mlx_lm.load`` reads it
unchanged. The layers compute with their dequantized weights while they are tuned (MLX
differentiates :func:`mlx.core.dequantize` in its scales and biases; the matrix products are
then ordinary float ones). The KL on every calibration sequence is measured before and after:
the tuned values are kept only when it went down, so the stage never makes its own objective
worse. The teacher's logits are computed a few sequences at a time, never stored.

Memory: the float model and the quantized one are both held while this runs (the float model
is read again from its files), so the stage is for models that fit twice; it is an option of a
recipe (``[distill]``), not part of the streaming default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from ..errors import RecipeError
from ..interrupt import check


def _positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise RecipeError(f"[distill] {attr.name} must be a number > 0, got {value!r}")


def _positive_int(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"[distill] {attr.name} must be an integer ≥ 1, got {value!r}")


def _seed(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"[distill] {attr.name} must be an integer ≥ 0, got {value!r}")


@attrs.frozen
class Distillation:
    """The ``[distill]`` table of a recipe.

    ``epochs`` passes over the calibration sequences in steps of ``batch_size`` sequences,
    drawn in an order set by ``seed``; Adam with a learning rate falling from ``lr`` to 0 on a
    cosine over the steps (``lr`` is an absolute step for scales and biases, whose values are
    the size of a weight's quantization step)."""

    epochs: int = attrs.field(default=1, validator=_positive_int)
    lr: float = attrs.field(default=1e-5, converter=lambda v: float(v) if isinstance(v, int) and
                            not isinstance(v, bool) else v, validator=_positive)
    batch_size: int = attrs.field(default=2, validator=_positive_int)
    seed: int = attrs.field(default=0, validator=_seed)

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (a recipe's ``[distill]`` table)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(Distillation)
                if getattr(self, f.name) != f.default}


@attrs.frozen
class DistillResult:
    """What the stage did: the calibration KL (nats per token) before and after, whether the
    tuned values were kept, the number of steps and the seconds it took."""

    kl_before: float
    kl_after: float
    kept: bool
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def token_kl(logits: mx.array, teacher_logprobs: mx.array) -> mx.array:
    """Mean over positions of KL(teacher ‖ model): ``logits`` of the model and the teacher's
    log-probabilities, both ``(..., vocabulary)``."""
    logq = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    return (mx.exp(teacher_logprobs) * (teacher_logprobs - logq)).sum(-1).mean()


class _Tuned(nn.Module):
    """An affine quantized linear or embedding computing with its dequantized weight, so that
    gradients reach its ``scales`` and ``biases`` (float32 while tuned)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = layer.weight
        self.scales = layer.scales.astype(mx.float32)
        self.biases = layer.biases.astype(mx.float32)
        if "bias" in layer:
            self.bias = layer.bias
        self._bits, self._group, self._embedding = layer.bits, layer.group_size, \
            isinstance(layer, nn.QuantizedEmbedding)

    def _w(self) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self._group,
                             bits=self._bits)

    def __call__(self, x: mx.array) -> mx.array:
        if self._embedding:
            return self._w()[x]
        y = x @ self._w().T
        return y + self.bias if "bias" in self else y

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self._w().T


def tunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers the stage tunes: affine quantized linears and embeddings."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            and getattr(m, "mode", "affine") == "affine" and m.get("biases") is not None]


def distill(student: nn.Module, teacher: Callable[[mx.array], mx.array], tokens: mx.array,
            config: Distillation, progress: Callable[[str, dict], None] | None = None
            ) -> DistillResult:
    """Tune ``student``'s scales and biases in place (see the module docstring) on the
    calibration ``tokens (n, length)``; ``teacher(x)`` gives the float model's logits."""
    start = time.perf_counter()
    layers = tunable_layers(student)
    if not layers:
        raise RecipeError("[distill] found no affine quantized layer to tune; drop [distill] "
                          "for this recipe (it tunes affine scales and biases)")
    tuned = {p: _Tuned(m) for p, m in layers}
    student.update_modules(tree_unflatten(list(tuned.items())))
    n, size = tokens.shape[0], config.batch_size
    inputs = tokens[:, :-1]
    steps = config.epochs * -(-n // size)

    def targets(x: mx.array) -> mx.array:
        return mx.stop_gradient(nn.log_softmax(teacher(x).astype(mx.float32), axis=-1))

    def objective(params: dict[str, mx.array], x: mx.array, t: mx.array) -> mx.array:
        student.update(tree_unflatten(list(params.items())))
        return token_kl(student(x), t)

    def measure(params: dict[str, mx.array]) -> float:
        total = 0.0
        for i in range(0, n, size):
            check("distill")
            x = inputs[i : i + size]
            kl = objective(params, x, targets(x))
            mx.eval(kl)
            total += np.asarray(kl).item() * x.shape[0]
        return total / n

    first = {f"{p}.{k}": getattr(m, k) for p, m in tuned.items() for k in ("scales", "biases")}
    try:
        before = measure(first)
        params = dict(first)
        opt = optim.Adam(learning_rate=optim.cosine_decay(config.lr, steps))
        step_fn = mx.value_and_grad(objective)
        rng = np.random.default_rng(config.seed)
        step = 0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                check("distill")  # Ctrl-C stops between steps
                x = inputs[mx.array(order[i : i + size])]
                loss, grads = step_fn(params, x, targets(x))
                params = opt.apply_gradients(grads, params)
                mx.eval(params, opt.state, loss)
                step += 1
                if progress is not None:
                    progress("distill", {"index": step, "total": steps, "loss": loss.item()})
        after = measure(params)
        kept = after < before
        final = params if kept else first
    finally:
        student.update_modules(tree_unflatten(layers))  # the quantized layers again
    for p, m in layers:
        m.scales = final[f"{p}.scales"].astype(m.scales.dtype)
        m.biases = final[f"{p}.biases"].astype(m.biases.dtype)
    mx.eval([(m.scales, m.biases) for _, m in layers])
    return DistillResult(kl_before=before, kl_after=after, kept=kept, steps=steps,
                         seconds=time.perf_counter() - start)
