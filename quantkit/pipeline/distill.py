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
worse.

It streams, block by block, like the walk before it. The float model is not held: the walk
carries the float model's final hidden states (as it carries its activations for
``target = "float_model"``), and the teacher's logits are the float head's on them, computed a
few sequences at a time. A step runs the quantized model forward one decoder block at a time,
keeping only each block's output, then back through the blocks in reverse, recomputing each
block's forward pass to take its gradient (gradient checkpointing per block): one block's
dequantized weights are held at a time. Where the walk wrote a block to a file, the block's
arrays go back to lazy loads of that file once it has run, so the codes the model holds do not
grow with its depth. Adam updates a block's scales and biases as soon as their gradient is
known; between uses a block's tuned values and Adam's two moments of them (6 float32 numbers a
quantization group) wait in the walk's activation store — scratch files on a CPU host, so there
nothing held grows with the depth; in memory on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from ..arch import decoder_blocks
from ..errors import RecipeError
from ..interrupt import check
from .calibrate import BlockRecorder, StopForward, capture, replaying
from .shards import reload_lazily


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
    gradients reach its ``scales`` and ``biases`` (float32 while tuned). It takes the layer's
    arrays over (the layer keeps none while it stands in) and gives them back with
    :meth:`give_back`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = layer.pop("weight")
        self.scales = layer.scales.astype(mx.float32)
        self.biases = layer.biases.astype(mx.float32)
        self._dtype = layer.pop("scales").dtype
        layer.pop("biases")
        if "bias" in layer:
            self.bias = layer.bias
        object.__setattr__(self, "_layer", layer)  # not a child module: not in the tree
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

    def give_back(self, scales: mx.array, biases: mx.array) -> nn.Module:
        """The quantized layer again, holding this one's codes and ``scales``/``biases`` (cast
        to the dtype the layer stored them in)."""
        layer = self._layer
        layer.weight = self.weight
        layer.scales, layer.biases = scales.astype(self._dtype), biases.astype(self._dtype)
        return layer


def tunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers the stage tunes: affine quantized linears and embeddings."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            and getattr(m, "mode", "affine") == "affine" and m.get("biases") is not None]


#: The float model's logits on the inputs of the calibration sequences with these indices.
Teacher = Callable[[list[int]], mx.array]


@attrs.define
class _Stream:
    """The student model run one decoder block at a time (see the module docstring)."""

    model: nn.Module
    blocks: list[nn.Module]
    paths: list[str]
    files: Sequence[Path | None]
    keys: list[list[str]]  # per block, the tuned parameters inside it
    outside: list[str]  # tuned parameters outside the blocks (embedding, head)
    #: Where a step keeps each block's input until its backward pass (the walk's activation
    #: store: scratch files on a CPU host, one block's read back at a time).
    store: Callable[[], MutableSequence[mx.array]] = list

    def set(self, params: Mapping[str, mx.array], keys: list[str]) -> None:
        if keys:
            self.model.update(tree_unflatten([(k, params[k]) for k in keys]))

    def release(self, i: int) -> None:
        """Block ``i``'s arrays back to lazy loads of its file (a no-op without one)."""
        if self.files[i] is not None:
            reload_lazily(self.model, self.files[i])

    def first_hidden(self, x: mx.array) -> mx.array:
        """Block 0's input on ``x`` (differentiable in the embedding)."""
        sink: list = []
        self.model.update_modules(tree_unflatten(
            [(self.paths[0], BlockRecorder(self.blocks[0], sink, last=True))]))
        try:
            self.model(x)
        except StopForward:
            pass
        finally:
            self.model.update_modules(tree_unflatten([(self.paths[0], self.blocks[0])]))
        return sink[0][0]

    def loss(self, params: Mapping[str, mx.array], x: mx.array, t: mx.array, scale: float,
             sink: Callable[[dict[str, mx.array]], None] | None) -> mx.array:
        """``scale`` × the mean KL of the student to ``t`` on ``x``; with ``sink``, its gradient
        in ``params`` goes there a part at a time: each block's (the last block first), then the
        parameters outside the blocks' (head and embedding uses summed). A block's parameters
        are not read again once their gradient is given: ``sink`` may change them."""
        self.set(params, self.outside)
        first, args = capture(self.model, self.blocks, self.paths, [x])
        block_args = [a[0] for a in args]
        hs = self.store()
        hs.append(first[0])
        del first
        for i, block in enumerate(self.blocks):
            check("distill")
            self.set(params, self.keys[i])
            a, kw = block_args[i]
            h = block(hs[i], *a, **kw)
            mx.eval(h)
            hs.append(h)
            del h
            self.release(i)

        def head(p: dict[str, mx.array], h: mx.array) -> mx.array:
            self.model.update(tree_unflatten(list(p.items())))
            with replaying(self.model, self.blocks, self.paths, [h]):
                return token_kl(self.model(x), t) * scale

        p_out = {k: params[k] for k in self.outside}
        if sink is None:
            value = head(p_out, hs[-1])
            mx.eval(value)
            del hs[:]
            return value
        value, (g_out, g) = mx.value_and_grad(head, argnums=(0, 1))(p_out, hs[-1])
        mx.eval(value, g_out, g)
        for i in reversed(range(len(self.blocks))):
            check("distill")
            through = partial(self._through, self.blocks[i], block_args[i], g)
            g_p, g = mx.grad(through, argnums=(0, 1))({k: params[k] for k in self.keys[i]}, hs[i])
            mx.eval(g_p, g)
            if isinstance(hs, list):
                hs[i + 1] = None  # type: ignore[call-overload]
            self.release(i)
            sink(g_p)
        del hs[:]
        if p_out:
            def embed(p: dict[str, mx.array]) -> mx.array:
                self.model.update(tree_unflatten(list(p.items())))
                return (self.first_hidden(x) * g).sum()

            g_in = mx.grad(embed)(p_out)
            g_out = {k: g_out[k] + g_in[k] for k in g_out}
        sink(g_out)
        return value

    def _through(self, block: nn.Module, args: tuple[tuple, dict], cotangent: mx.array,
                 p: dict[str, mx.array], h: mx.array) -> mx.array:
        """``block``'s output on ``h`` against ``cotangent``: its gradient in ``(p, h)`` is the
        block's vector-Jacobian product (the block's forward pass is recomputed for it)."""
        self.model.update(tree_unflatten(list(p.items())))
        return (block(h, *args[0], **args[1]) * cotangent).sum()


def distill(student: nn.Module, teacher: Teacher, tokens: mx.array, config: Distillation,
            progress: Callable[[str, dict], None] | None = None, *,
            files: Sequence[Path | None] | None = None, held: set[int] | None = None,
            reduce: Callable[[mx.array], mx.array] | None = None,
            store: Callable[[], MutableSequence[mx.array]] = list) -> DistillResult:
    """Tune ``student``'s scales and biases in place (see the module docstring) on the
    calibration ``tokens (n, length)``: the inputs ``tokens[:, :-1]``, the targets
    ``teacher(indices)``, the float model's logits on those inputs.

    ``files``: per decoder block, the file the walk wrote it to (its arrays are reloaded lazily
    from it after each use; ``None``: the block stays in memory). ``held``: the sequences this
    process computes (default: all) and ``reduce``: a sum over the processes of a group (each
    step's gradient and each KL figure), for a run over several processes, each holding some
    of the sequences' float hidden states. ``store``: where a step keeps the blocks' inputs
    (e.g. the walk's scratch files on a CPU host)."""
    start = time.perf_counter()
    layers = tunable_layers(student)
    if not layers:
        raise RecipeError("[distill] found no affine quantized layer to tune; drop [distill] "
                          "for this recipe (it tunes affine scales and biases)")
    blocks = decoder_blocks(student)
    paths_of = {id(m): p for p, m in student.named_modules()}
    paths = [paths_of[id(b)] for b in blocks]
    files = list(files) if files is not None else [None] * len(blocks)
    n, size = tokens.shape[0], config.batch_size
    held = set(range(n)) if held is None else held
    inputs = tokens[:, :-1]
    steps = config.epochs * -(-n // size)

    tuned = {p: _Tuned(m) for p, m in layers}
    student.update_modules(tree_unflatten(list(tuned.items())))
    names = sorted(f"{p}.{k}" for p in tuned for k in ("scales", "biases"))
    inside = [[k for k in names if k.startswith(b + ".")] for b in paths]
    stream = _Stream(student, blocks, paths, files, inside,
                     [k for k in names if not any(k.startswith(b + ".") for b in paths)], store)
    on_file = {k for b, keys in enumerate(inside) if files[b] is not None for k in keys}
    params = {k: getattr(tuned[k.rpartition(".")[0]], k.rpartition(".")[2]) for k in names}
    # The values to go back to: those in the blocks' files are read again from there.
    first = {k: v for k, v in params.items() if k not in on_file}
    for b in range(len(blocks)):
        stream.release(b)  # the block's arrays, evaluated by the walk, held once more lazily

    def summed(x: mx.array) -> mx.array:
        return x if reduce is None else reduce(x)

    def targets(idx: list[int]) -> mx.array:
        t = mx.stop_gradient(nn.log_softmax(teacher(idx).astype(mx.float32), axis=-1))
        mx.eval(t)
        return t

    def measure(params: Mapping[str, mx.array]) -> float:
        total = mx.array(0.0)
        for i in range(0, n, size):
            mine = [j for j in range(i, min(i + size, n)) if j in held]
            if mine:
                total = total + stream.loss(params, inputs[mx.array(mine)], targets(mine),
                                            float(len(mine)), None)
        return summed(total).item() / n

    # Adam (lr on a cosine), a part of the parameters at a time: each block's as soon as its
    # gradient is known, so the gradients of the whole model are never held at once. Every
    # part sees the step's learning rate: the same arithmetic as one update of them all. A
    # block's values and Adam's moments of them wait in ``store`` between uses (flat).
    opt = optim.Adam(learning_rate=optim.cosine_decay(config.lr, steps))
    params = _Values(params, inside, store)
    opt.init(params.outside)
    step = 0

    def apply(grads: dict[str, mx.array]) -> None:
        if not grads:
            return
        keys = sorted(grads)
        flat = mx.concatenate([grads[k].reshape(-1) for k in keys])
        if reduce is not None:  # summed over the processes (each holds some sequences)
            flat = reduce(flat)
        opt.state["step"] = mx.array(step, mx.uint64)
        b = params.block_of.get(keys[0])
        if b is None:
            offsets = np.cumsum([0] + [grads[k].size for k in keys])
            grads = {k: flat[offsets[j]:offsets[j + 1]].reshape(grads[k].shape)
                     for j, k in enumerate(keys)}
            new = opt.apply_gradients(grads, {k: params[k] for k in keys})
            params.outside.update(new)
            mx.eval(list(new.values()), [opt.state[k] for k in keys])
            return
        value, m, v = params.slots[b]
        opt.state["block"] = {"m": m, "v": v}
        new = opt.apply_gradients({"block": flat}, {"block": value})["block"]
        moments = opt.state.pop("block")
        params.put(b, new, moments["m"], moments["v"])

    kept = False
    try:
        before = measure(params)
        rng = np.random.default_rng(config.seed)
        for _ in range(config.epochs):
            order = rng.permutation(n)
            for i in range(0, n, size):
                check("distill")  # Ctrl-C stops between steps
                batch = [int(j) for j in order[i : i + size]]
                mine = [j for j in batch if j in held]
                loss = mx.array(0.0)
                if mine:
                    loss = stream.loss(params, inputs[mx.array(mine)], targets(mine),
                                       len(mine) / len(batch), apply)
                else:  # nothing of this step here: zeros to the other processes' sums
                    for keys in [*reversed(inside), stream.outside]:
                        apply({k: mx.zeros_like(params[k]) for k in keys})
                if reduce is not None:
                    loss = reduce(loss)
                step += 1
                if progress is not None:
                    progress("distill", {"index": step, "total": steps, "loss": loss.item()})
        after = measure(params)
        kept = after < before
    finally:
        _give_back(student, tuned, params.as_dict() if kept else first, files, paths)
    return DistillResult(kl_before=before, kl_after=after, kept=kept, steps=steps,
                         seconds=time.perf_counter() - start)


class _Values(Mapping[str, mx.array]):
    """The tuned values by name: those outside the blocks in memory (``outside``), each block's
    flat, with Adam's two moments of them, in a sequence of ``store`` (``slots[b]``: values, m,
    v; scratch files on a CPU host), read back a block at a time."""

    def __init__(self, values: dict[str, mx.array], blocks: list[list[str]],
                 store: Callable[[], MutableSequence[mx.array]]) -> None:
        self.block_of = {k: b for b, keys in enumerate(blocks) for k in keys}
        self.outside = {k: v for k, v in values.items() if k not in self.block_of}
        self._keys = blocks
        self._shapes = {k: v.shape for k, v in values.items()}
        self.slots: list[MutableSequence[mx.array]] = []
        for keys in blocks:
            slot = store()
            if keys:
                flat = mx.concatenate([values[k].reshape(-1) for k in keys])
                slot.extend([flat, mx.zeros_like(flat), mx.zeros_like(flat)])
            self.slots.append(slot)
        self._cached: tuple[int, dict[str, mx.array]] | None = None

    def _block(self, b: int) -> dict[str, mx.array]:
        flat, keys = self.slots[b][0], self._keys[b]
        sizes = [int(np.prod(self._shapes[k])) for k in keys]
        offsets = np.cumsum([0] + sizes)
        return {k: flat[offsets[j]:offsets[j + 1]].reshape(self._shapes[k]) for j, k in enumerate(keys)}

    def put(self, b: int, value: mx.array, m: mx.array, v: mx.array) -> None:
        """Block ``b``'s new values and moments (evaluated: no graph runs from step to step)."""
        mx.eval(value, m, v)
        self.slots[b][0], self.slots[b][1], self.slots[b][2] = value, m, v
        self._cached = None

    def __getitem__(self, k: str) -> mx.array:
        b = self.block_of.get(k)
        if b is None:
            return self.outside[k]
        if self._cached is None or self._cached[0] != b:  # one block's values at a time
            self._cached = (b, self._block(b))
        return self._cached[1][k]

    def __iter__(self):
        return iter([*self.block_of, *self.outside])

    def __len__(self) -> int:
        return len(self.block_of) + len(self.outside)

    def as_dict(self) -> dict[str, mx.array]:
        out = dict(self.outside)
        for b in range(len(self.slots)):
            if self._keys[b]:
                out.update(self._block(b))
        return out


def _give_back(model: nn.Module, tuned: dict[str, _Tuned], values: dict[str, mx.array],
               files: Sequence[Path | None], paths: list[str]) -> None:
    """The quantized layers back in ``model`` with ``values`` as their scales and biases; a
    layer without an entry there gets its block file's."""
    stored: dict[str, mx.array] = {}
    for b, f in zip(paths, files):
        if f is not None and any(p.startswith(b + ".") and f"{p}.scales" not in values for p in tuned):
            stored.update(mx.load(str(f)))
    source = {**stored, **values}
    layers = [(p, t.give_back(source[f"{p}.scales"], source[f"{p}.biases"])) for p, t in tuned.items()]
    model.update_modules(tree_unflatten(layers))
    mx.eval([(m.scales, m.biases) for p, m in layers if f"{p}.scales" in values])


__all__ = ["DistillResult", "Distillation", "Teacher", "distill", "token_kl", "tunable_layers"]
