"""Learned rounding as a :class:`BlockOptimizer`: after a block's layers are quantized (GPTQ or
RTN), tune their codes and per-group scales and biases against the float block's outputs.

``method = "scales"`` (the default; as mlx-lm's DWQ, per block): codes fixed, per-group scales
and biases tuned. ``method = "signround"`` (AutoRound's SignRound, from the solve's codes): rounding
offsets ``v`` in ``[-0.5, 0.5]`` added to each weight's position on its grid before rounding,
and per-group scale and bias adjustments, moved by signed gradient steps with a linearly
decaying step size. Measured on stories260K-pad192 3-bit g32 after GPTQ (act-order + scale
search), 40 whole-batch steps per block: ``scales`` perplexity 6.506 in 442 s, ``signround``
6.601 in 978 s; with steps of 2 sequences over 4 epochs (the defaults now) ``signround`` 5.982,
``scales`` 6.503, and ``signround`` leads at 4 bits and on the MoE fixture too; the default
pipeline (quantkit.defaults) runs ``signround`` (docs/results-quality.md). Gradients flow through dense dequantized weights (MLX's CPU quantized matmul is
slow), and the result is written back in MLX's storage format, so ``mlx_lm.load`` reads it.

Cost: a step's forward and backward pass runs on ``batch_size`` calibration sequences (2 by
default, as minibatches in DWQ), and ``steps = None`` (the default) means ``epochs`` passes
over the calibration sequences, so the cost grows with the calibration set as GPTQ's does.
Measured (perplexity and time against whole-batch steps): docs/results-quality.md.

The objective is the mean squared error of the block's output over its calibration inputs
(summed over processes through ``ctx.reduce``). It is measured exactly (the values that will
be stored) before tuning and every ``eval_every`` steps; the best measured state is kept, so
the objective never increases. Deterministic for a given ``ctx.seed``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from typing import Any, ClassVar, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models import base
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ..kernels.packing import pack_bits
from ..kernels.rounding import (
    grid_position,
    kl_divergence,
    learned_weight,
    learned_weight_grads,
    sign_step,
    step_scale,
    token_weights,
)
from .base import BlockContext, BlockOptimizer, register_optimizer

_STORAGE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_BOUNDS = {"v": 0.5, "ds": 0.5, "db": 1.0, "dn": 0.5}


@attrs.frozen
class _Layer:
    path: str
    module: nn.Module  # the quantized layer (written back in place)
    standin: nn.Module  # a dense layer computing with the learned weight (no weight of its own)
    kept: MutableSequence[mx.array]  # where ``u`` waits (see BlockContext.store)
    slot: int
    scales: mx.array
    biases: mx.array
    bits: int

    @property
    def u(self) -> mx.array:
        """The position of each weight on its grid (the codes when there is no float weight);
        on a CPU read back from its scratch file at each use, so it is resident only while
        a computation needs it."""
        return self.kept[self.slot]


def _none_or_positive(_: Any, attribute: Any, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1 (or None), got {value}")


@register_optimizer
@attrs.frozen
class LearnedRounding(BlockOptimizer):
    """``steps`` signed-gradient steps of size ``lr`` (default ``lr_scale / steps``) decaying to 0,
    each on ``batch_size`` calibration sequences; ``steps = None``: ``epochs`` passes over the
    block's calibration sequences (so the cost follows the calibration set, as GPTQ's does);
    ``storage``: the dtype the scales and biases are rounded to while tuning (bfloat16 values
    are exact in float16 and float32 too)."""

    name: ClassVar[str] = "learned_rounding"
    method: str = attrs.field(default="scales",
                              validator=attrs.validators.in_(("signround", "scales")))
    steps: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    lr: float | None = None
    #: The first step when ``lr`` is ``None``: ``lr_scale / steps`` (steps decaying linearly to
    #: 0, so an offset can travel ``lr_scale / 2`` of a grid step in all; 1 is AutoRound's
    #: ``1 / iters``).
    lr_scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    eval_every: int = attrs.field(default=25, validator=attrs.validators.ge(1))
    storage: str = attrs.field(default="bfloat16", validator=attrs.validators.in_(tuple(_STORAGE)))
    #: Calibration sequences per step (``None``: one whole calibration batch). A step's cost
    #: grows with its sequences; the steps go through the batches' rows in a seeded order.
    batch_size: int | None = attrs.field(
        default=2, validator=_none_or_positive)
    #: Passes over the calibration sequences when ``steps`` is ``None``.
    epochs: float = attrs.field(default=4.0, validator=attrs.validators.gt(0))
    #: What the block's output is compared with: ``"float_block"``, the float block run on the
    #: quantized model's activations (the block corrects its own error only);
    #: ``"float_model"``, the float model's own activations at that depth (the block also
    #: corrects the error accumulated by the blocks before it, as AutoRound does).
    target: str = attrs.field(default="float_block",
                              validator=attrs.validators.in_(("float_block", "float_model")))
    #: Also tune the output head (``lm_head`` or a tied embedding) after the last block, against
    #: the float head's logits (KL divergence), as one more block (quantkit.pipeline.head).
    head: bool = False
    #: Where ``signround`` starts each weight on its grid (always on the solve's code):
    #: ``"code"``, the centre of the code (``u + v`` = the code; a weight changes code only
    #: after its offset has moved half a step); ``"float"``, the point of the code's interval
    #: nearest to the float weight's position, at least ``start_margin`` inside it (``v = 0``
    #: where the solve kept the nearest code, as AutoRound starts from round to nearest).
    start: str = attrs.field(default="code", validator=attrs.validators.in_(("code", "float")))
    start_margin: float = attrs.field(default=0.1, validator=[attrs.validators.ge(0),
                                                              attrs.validators.lt(0.5)])
    #: The order the steps draw the calibration sequences in: block ``i`` uses the stream seeded
    #: ``2 i + 1000 · seed`` (another seed, another order: how much the result depends on it is
    #: measured in docs/results-quality.md).
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: A layer reading more inputs than this takes steps ``sqrt(step_width / inputs)`` times
    #: ``lr`` (``None``: every layer ``lr``). A signed step moves every weight of a row by the
    #: same amount in the direction that lowers the objective, so the row's output moves in
    #: proportion to its number of inputs, where rounding's own error grows as its square root.
    step_width: int | None = attrs.field(default=None, validator=_none_or_positive)
    #: Also tune the block's norm weights (RMSNorm / LayerNorm scales, kept in float by the
    #: output), each by a relative adjustment ``w (1 + dn)``, ``dn`` in ``[-0.5, 0.5]``, moved by
    #: signed steps ``norm_step`` times the rounding's step (0: norms not tuned), as in norm
    #: tweaking (Li et al., 2023), here against the same block objective.
    norm_step: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    #: How the squared errors of a block's output positions are weighed: ``"none"``, alike;
    #: ``"token"``, each position's divided by its target's mean square, so the objective is
    #: the error relative to the hidden state's size, which is what the next RMSNorm passes on
    #: (a model's first position can carry a hidden state ~100x the others', whose errors would
    #: otherwise dominate the objective).
    weighting: str = attrs.field(default="none", validator=attrs.validators.in_(("none", "token")))

    def optimize(self, ctx: BlockContext, targets: Sequence[mx.array]) -> dict[str, Any]:
        layers = self._layers(ctx)
        if not layers:  # the same on every process (each holds the whole block)
            return {"layers": 0}
        # A process without calibration batches (fewer batches than processes) still takes
        # part in every sum, with zero contributions: the processes' sums must pair up.
        storage = _STORAGE[self.storage]
        params = {L.path: self._initial(L) for L in layers}
        norms = _norms(ctx.block) if self.norm_step > 0 else []
        params.update({n.key: {"dn": mx.zeros(n.weight.shape)} for n in norms})
        mx.eval(params)
        calls: list[str] = []  # the tuned layers in the order a forward pass calls them
        tuned = [_Tuned(L, storage, calls) for L in layers]

        def install(which: str) -> None:
            ctx.block.update_modules(tree_unflatten(
                [(L.path, t if which == "tuned" else L.module) for L, t in zip(layers, tuned)]))

        def use(p: dict | None, recompute: bool = False) -> None:
            for t in tuned:
                t.use(None if p is None else p[t.layer.path], recompute)
            for n in norms:
                n.module.weight = n.weight if p is None else n.adjusted(p[n.key]["dn"], storage)

        kl = ctx.objective == "kl"

        def batch_loss(p: dict, j: int, rows: slice) -> mx.array:
            use(p, recompute=True)
            if rows == slice(None):
                out = ctx.forward(ctx.block, j)
            else:
                out = ctx.forward(_Rows(ctx.block, rows, targets[j].shape[0]), j)
            if kl:
                return mx.mean(kl_divergence(targets[j][rows], out))
            t = targets[j][rows]
            return mx.mean(self._weights(t) * mx.square(out - t))

        # The objective's forward passes run ``batch_size`` sequences at a time where the
        # outputs are the same bytes as a whole batch's (on a CPU, see _rows_exact); the
        # differences are summed over whole batches as ever.
        rows_exact = self.batch_size is not None and _rows_exact()

        def forward(j: int) -> mx.array:
            n = targets[j].shape[0]
            if not rows_exact or n <= cast(int, self.batch_size):
                return ctx.forward(ctx.block, j)
            size = cast(int, self.batch_size)
            parts = []
            for r in range(0, n, size):  # one part's intermediates held at a time
                parts.append(ctx.forward(_Rows(ctx.block, slice(r, min(r + size, n)), n), j))
                mx.eval(parts[-1])
            return mx.concatenate(parts)

        def full_loss(p: dict | None) -> float:
            use(p)  # None: the solve's own values
            total = mx.zeros((2,))
            if kl:  # logits are as wide as the vocabulary: a step's rows at a time
                for j, rows in chunks:
                    n = targets[j].shape[0]
                    d = kl_divergence(targets[j][rows], ctx.forward(_Rows(ctx.block, rows, n), j))
                    total = total + mx.stack([mx.sum(d), mx.array(float(d.size))])
                    mx.eval(total)
            else:
                for j in range(len(ctx.inputs)):
                    d = forward(j) - targets[j]
                    total = total + mx.stack([mx.sum(self._weights(targets[j]) * mx.square(d)),
                                              mx.array(float(d.size))])
                    mx.eval(total)
            use(None)  # (the dense weights go)
            total = ctx.reduce(total)
            return float(cast(float, (total[0] / total[1]).item()))

        rng = np.random.default_rng(ctx.seed + ctx.index + 1000 * self.seed)
        chunks = _chunks([t.shape[0] for t in targets], self.batch_size)
        if kl and self.batch_size is None:  # whole batches of logits: too wide
            chunks = _chunks([t.shape[0] for t in targets], 1)
        steps = self.steps
        total, processes = cast(list[float], ctx.reduce(mx.array([float(len(chunks)), 1.0])).tolist())
        if steps is None:  # the same number on every process: from the chunks of all of them
            steps = max(1, math.ceil(self.epochs * total / processes))
        lr0 = self.lr if self.lr is not None else self.lr_scale / max(steps, 1)
        scale = {L.path: step_scale(L.scales.shape[-1] * L.module.group_size, self.step_width)
                 for L in layers}
        scale.update({n.key: self.norm_step for n in norms})
        install("tuned")
        try:
            # The objective needs no gradients: measured with the attention the pipeline
            # installed (NumPy on a CPU, see quantkit.host), the steps with MLX's own.
            before = best = full_loss(None)
            # The best measured state is kept as the stored values it gives (packed codes,
            # scales, biases: ~1/6 of the float offsets at 4 bits), not as the offsets.
            best_stored: dict[str, dict[str, mx.array]] | None = None
            best_norms: dict[str, mx.array] = {}
            best_step = 0
            order: list[int] = []
            for step in range(steps):
                if not order:
                    order = list(rng.permutation(len(chunks)))
                with _mlx_attention(ctx.block):
                    calls.clear()
                    if order:
                        j, rows = chunks[int(order.pop())]
                        _, grads = mx.value_and_grad(
                            lambda p, j=j, rows=rows: batch_loss(p, j, rows))(params)
                    else:  # no batch here
                        grads = tree_map(mx.zeros_like, params)
                    use(None)  # (the tuned layers let go of the offsets)
                    lr = lr0 * (1 - step / steps)
                    if processes == 1:
                        # Layer by layer in the order the backward pass reaches them (the
                        # calls reversed): its gradients evaluated, its offsets stepped (the
                        # same values): the old offsets are freed as the pass leaves each layer,
                        # and one layer's gradients are held at a time.
                        for path in [*reversed(calls), *(p for p in params if p not in calls)]:
                            g = grads.pop(path)
                            mx.eval(g)
                            params[path] = {k: sign_step(x, g[k], lr * scale[path], _BOUNDS[k])
                                            for k, x in params[path].items()}
                            del g
                            mx.eval(params[path])
                    else:
                        # Summed over the processes in one fixed order on every process (a
                        # process without a batch has no calls); one layer's backward pass
                        # evaluated at a time.
                        for path in reversed(list(grads)):
                            mx.eval(grads[path])
                        grads = _reduce_tree(ctx, grads)
                        params = {path: {k: sign_step(x, grads[path][k], lr * scale[path],
                                                      _BOUNDS[k])
                                         for k, x in q.items()} for path, q in params.items()}
                        del grads
                        mx.eval(params)
                if (step + 1) % self.eval_every == 0 or step + 1 == steps:
                    loss = full_loss(params)
                    if loss < best:
                        best, best_step = loss, step + 1
                        best_stored = {}
                        for L in layers:  # one layer's weight made at a time
                            best_stored[L.path] = _stored(L, params[L.path], storage)
                            mx.eval(best_stored[L.path])
                        best_norms = {n.key: n.adjusted(params[n.key]["dn"], storage)
                                      for n in norms}
                        mx.eval(best_norms)
        finally:
            install("quantized")
            use(None)
        if best_stored is not None:
            for L in layers:
                L.module.update(best_stored[L.path])
                mx.eval(L.module.parameters())
            for n in norms:
                n.module.weight = best_norms[n.key]
        return {"layers": len(layers), "loss_before": before, "loss_after": best,
                "best_step": best_step, "method": self.method, "steps": steps}

    def _weights(self, targets: mx.array) -> mx.array | float:
        """The weight of each output position's squared error (see ``weighting``)."""
        if self.weighting == "none":
            return 1.0
        return token_weights(targets)

    def _layers(self, ctx: BlockContext) -> list[_Layer]:
        out = []
        kept = ctx.store()
        leaves: Any = tree_flatten(ctx.block.leaf_modules(),
                                                     is_leaf=nn.Module.is_module)
        for path, m in leaves:
            kind = type(m)
            if kind not in (nn.QuantizedLinear, QuantizedSwitchLinear) or m.mode != "affine":
                continue
            scales = m.scales.astype(mx.float32)
            biases = m.biases.astype(mx.float32)
            codes = _codes(m)
            flt = ctx.float_layers.get(path)
            u = codes
            if self.method == "signround" and flt is not None and flt.weight.shape == codes.shape:
                u = grid_position(flt.weight, scales, biases)
            del flt  # (the float layer is read once: u holds what is needed of it)
            mx.eval(u, scales, biases)
            kept.append(u)
            shape = codes.shape
            del u, codes
            if kind is nn.QuantizedLinear:
                standin: nn.Module = nn.Linear(shape[-1], shape[-2], bias="bias" in m)
            else:
                standin = SwitchLinear(shape[-1], shape[-2], shape[0], bias="bias" in m)
            if "bias" in m:
                standin.bias = m.bias.astype(mx.float32)
            # Its weight is made for each call (see _Tuned), never held.
            del standin["weight"]
            out.append(_Layer(path, m, standin, kept, len(kept) - 1, scales, biases, m.bits))
        return out

    def _initial(self, L: _Layer) -> dict[str, mx.array]:
        p = {"ds": mx.zeros(L.scales.shape), "db": mx.zeros(L.biases.shape)}
        if self.method == "signround":
            codes = _codes(L.module)
            if self.start == "float":
                m = 0.5 - self.start_margin
                p["v"] = mx.clip(mx.clip(L.u, codes - m, codes + m) - L.u, -0.5, 0.5)
            else:
                p["v"] = mx.clip(codes - L.u, -0.5, 0.5)
        return p


@attrs.frozen
class _Norm:
    """A norm of the block whose weight is tuned: ``weight`` its value before tuning."""

    path: str
    module: nn.Module
    weight: mx.array

    @property
    def key(self) -> str:  # (a layer path never holds a space)
        return "norm " + self.path

    def adjusted(self, dn: mx.array, storage: mx.Dtype) -> mx.array:
        """The weight ``w (1 + dn)``, rounded to ``storage`` and held in the weight's dtype."""
        w = self.weight.astype(mx.float32) * (1 + dn)
        return w.astype(storage).astype(self.weight.dtype)


def _norms(block: nn.Module) -> list[_Norm]:
    """The block's norms with a weight (RMSNorm and LayerNorm, mlx's or a model's own class of
    that name), in module order."""
    leaves: Any = tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module)
    return [_Norm(path, m, m.weight) for path, m in leaves
            if isinstance(m, (nn.RMSNorm, nn.LayerNorm))
            or (type(m).__name__.endswith(("RMSNorm", "LayerNorm")) and "weight" in m)]


def _stored(L: _Layer, q: dict, storage: mx.Dtype) -> dict[str, mx.array]:
    """The arrays ``L``'s quantized layer stores for the learned parameters ``q`` (its
    ``weight``, ``scales`` and ``biases``, in the layer's dtypes)."""
    _, codes, s, b = learned_weight(L.u, q.get("v", mx.zeros_like(L.u)), L.scales, L.biases,
                                    q["ds"], q["db"], L.bits, storage)
    m = L.module
    return {"weight": pack_bits(codes.astype(mx.uint8), L.bits),
            "scales": s.astype(m.scales.dtype), "biases": b.astype(m.biases.dtype)}


def _learned_weight(L: _Layer, storage: mx.Dtype) -> Callable[..., mx.array]:
    """``(ds, db, v) ->`` the dense weight of ``L`` (:func:`learned_weight`), whose gradients
    are :func:`learned_weight_grads`: MLX's own values, without holding the forward pass's
    full-size intermediates."""

    @mx.custom_function
    def weight(ds: mx.array, db: mx.array, v: mx.array) -> mx.array:
        return learned_weight(L.u, v, L.scales, L.biases, ds, db, L.bits, storage)[0]

    @weight.vjp
    def weight_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        ds, db, v = primals
        dv, dds, ddb = learned_weight_grads(L.u, v, L.scales, L.biases, ds, db, L.bits, storage,
                                            cotangent)
        return dds, ddb, dv

    return cast(Callable[..., mx.array], weight)


class _Tuned(nn.Module):
    """Stands in for a quantized layer while it is tuned: computes with the dense weight its
    current learned parameters give (:meth:`use`; ``None``: the solve's own values). With
    ``recompute`` (a gradient step) the weight is made for each call and the layer's product
    runs inside ``mx.checkpoint``: the backward pass recomputes them from the parameters and
    the layer's input instead of holding them (the same operations, so the same values).
    Without (measuring the objective, part after part of every batch) the weight is made at
    the first call and kept until the next :meth:`use`."""

    def __init__(self, layer: _Layer, storage: mx.Dtype, calls: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_learned", _learned_weight(layer, storage))
        self.use(None)

    def use(self, q: dict | None, recompute: bool = False) -> None:
        object.__setattr__(self, "_q", q)
        object.__setattr__(self, "_recompute", recompute)
        object.__setattr__(self, "_kept", None)

    def _weight(self, p: tuple[mx.array, ...]) -> mx.array:
        L = self.layer
        if not p:
            return _dequantized(L.module)
        ds, db, *v = p
        return self._learned(ds, db, v[0] if v else mx.zeros_like(L.u))

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        standin = self.layer.standin
        if self.layer.path not in self._calls:
            self._calls.append(self.layer.path)

        def run(x: mx.array, *p: mx.array) -> mx.array:
            standin["weight"] = self._weight(p) if self._recompute else self._kept
            try:
                return standin(x, *args, **kwargs)
            finally:
                del standin["weight"]

        q = self._q
        p = () if q is None else (q["ds"], q["db"], *([q["v"]] if "v" in q else []))
        if self._recompute:
            return mx.checkpoint(run)(x, *p)
        if self._kept is None:
            object.__setattr__(self, "_kept", self._weight(p))
            mx.eval(self._kept)
        return run(x)


@functools.cache
def _rows_exact() -> bool:
    """Whether a block's outputs on some of a batch's sequences are, bit for bit, the rows of
    its output on the whole batch: on a CPU, where MLX multiplies with a BLAS whose row slices
    of a product are the whole product's (checked once on a probe, as
    :func:`quantkit.host.row_slices_exact` checks NumPy's); attention, norms and elementwise
    operations are per sequence or per row. Not assumed on a GPU."""
    if mx.default_device() != mx.cpu:
        return False
    k1, k2 = mx.random.split(mx.random.key(0))
    x = mx.random.normal((3 * 64 + 37, 300), key=k1)
    w = mx.random.normal((300, 2 * 256 + 40), key=k2)
    whole = x @ w
    bounds = [0, 64, 2 * 64 + 11, x.shape[0]]
    return all(np.array_equal(np.array(x[a:b] @ w), np.array(whole[a:b]))
               for a, b in zip(bounds, bounds[1:]))


def _chunks(batch_rows: list[int], size: int | None) -> list[tuple[int, slice]]:
    """``(batch, rows)`` pairs covering every row of every batch, ``size`` rows at most each
    (``None``: whole batches)."""
    if size is None:
        return [(j, slice(None)) for j in range(len(batch_rows))]
    return [(j, slice(r, min(r + size, n))) for j, n in enumerate(batch_rows)
            for r in range(0, n, size)]


class _Rows(nn.Module):
    """Runs ``block`` on ``rows`` of a batch of ``n`` sequences: the hidden states and every
    array argument whose first axis is the batch's (per-sequence masks) are cut to those rows;
    other arguments (a ``"causal"`` mask, a ``(length, length)`` mask) are passed whole."""

    def __init__(self, block: nn.Module, rows: slice, n: int) -> None:
        super().__init__()
        self.block, self._rows, self._n = block, rows, n

    def _cut(self, value: Any, length: int) -> Any:
        if isinstance(value, mx.array) and value.ndim >= 2 and value.shape[0] == self._n \
                and value.shape != (length, length):
            return value[self._rows]
        return value

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        length = x.shape[1]
        return self.block(x[self._rows], *(self._cut(a, length) for a in args),
                          **{k: self._cut(v, length) for k, v in kwargs.items()})


def _codes(m: nn.Module) -> mx.array:
    """A quantized layer's integer codes, as float32."""
    ones = mx.ones(m.scales.shape, mx.float32)
    return mx.dequantize(m.weight, ones, mx.zeros_like(ones), group_size=m.group_size,
                         bits=m.bits, mode="affine", dtype=mx.float32)


def _dequantized(m: nn.Module) -> mx.array:
    return mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits,
                         mode="affine", dtype=mx.float32)


def _reduce_tree(ctx: BlockContext, tree: dict) -> dict:
    """``tree`` (a dict per layer) summed over the processes of the run, one flat buffer per
    layer (a copy of one layer's gradients at a time, not of the block's)."""
    return {path: _reduce_flat(ctx, q) for path, q in tree.items()}


def _reduce_flat(ctx: BlockContext, tree: dict) -> dict:
    """``tree`` summed over the processes of the run, as one flat buffer."""
    flat: Any = tree_flatten(tree)
    if not flat:
        return tree
    buf = ctx.reduce(mx.concatenate([v.reshape(-1) for _, v in flat]))
    sizes = np.cumsum(np.array([0] + [v.size for _, v in flat]))
    parts = iter(buf[a:b] for a, b in zip(sizes[:-1], sizes[1:]))
    return tree_map(lambda v: next(parts).reshape(v.shape), tree)


@contextlib.contextmanager
def _mlx_attention(block: nn.Module) -> Iterator[None]:
    """MLX's own attention in ``block``'s model code while gradients flow through it (a NumPy
    attention, see :mod:`quantkit.host`, may be swapped in for the calibration)."""
    original = base.scaled_dot_product_attention
    name = "scaled_dot_product_attention"
    modules = {sys.modules.get(type(m).__module__) for _, m in block.named_modules()}
    swapped = [(m, getattr(m, name)) for m in modules
               if m is not None and getattr(m, name, original) is not original]
    for m, _ in swapped:
        setattr(m, name, original)
    try:
        yield
    finally:
        for m, fn in swapped:
            setattr(m, name, fn)


__all__ = ["LearnedRounding"]
