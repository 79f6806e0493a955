"""Automatic mixed precision: per-layer bits and group sizes that meet a bits-per-weight budget.

Two steps, both reusing the walker (the profiler follows it through its public hook,
:class:`~quantkit.pipeline.hooks.WalkHook`):

1. **Measure.** A profiling walk (sequential, block by block, exactly like a real run) computes
   for every layer the Hessian-weighted output error ``trace(ΔW H ΔWᵀ)`` — the mean squared error
   the layer adds to its outputs per calibration token — that each candidate spec gives with the
   layer's own strategy (GPTQ unless the base recipe says otherwise). So that later blocks see
   quantized inputs, as they will in the real run, the profiling walk quantizes every layer at a
   *reference* spec: the candidate whose storage cost is closest to the target.
2. **Allocate.** One candidate per layer, minimizing the summed error subject to the budget:
   greedily by error reduction per extra stored bit along each layer's lower convex hull (the
   Lagrangian solution of the knapsack), then any remaining bits go to the best single upgrades
   that still fit.

The plan is a :class:`~quantkit.recipe.Recipe` (an exact-path rule for every layer that differs
from its default) that :meth:`MixedPlan.to_toml` writes for the user to edit and re-run.

**What the bits per weight count** (as ``mlx_lm.utils.compute_bits_per_weight`` does): every
parameter byte of the stored model — quantized weights at ``bits`` each plus one scale and one
bias per group in the layer's own dtype (16 bits each for half-precision models), layers left in
full precision at their dtype, embeddings, norms and biases — divided by the number of weights
of the unquantized model.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .arch import decoder_blocks
from .checkpoint import BlockFiles
from .errors import FactorizationError, QuantkitError
from .hessian import HessianStats
from .interrupt import check
from .pipeline.calibrate import capture, replaying
from .pipeline.dtypes import DTYPES, restore_dtypes
from .pipeline.hooks import Progress, WalkHook
from .pipeline.plan import LayerPlan
from .pipeline.shards import reload_lazily
from .quantizers import Quantizer, RTNQuantizer
from .recipe import Recipe
from .registry import Wrapper
from .report import RunReport
from .specs import QuantSpec
from .validate import check_settings
from .walker import ModelWalker

#: Candidate storage formats, from 2.25 to 8.5 bits per weight with 16-bit scales.
DEFAULT_CANDIDATES: tuple[QuantSpec, ...] = tuple(
    QuantSpec(bits, group_size)
    for bits, group_size in (
        (2, 64), (2, 32), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32),
        (5, 64), (6, 64), (8, 64),
    )
)


#: ``fisher``: Fisher-weighted output error; ``output``: plain output error; ``kl``: the model's
#: output KL with one layer quantized at a time, at every candidate; ``kl-fast``: that KL at one
#: candidate per layer, the others scaled by the layer's output errors; ``kl-grad``: a
#: first-order estimate of that KL from one gradient of the KL taken in the low-bit model.
SENSITIVITIES = ("fisher", "output", "kl", "kl-fast", "kl-grad")


class BudgetError(QuantkitError, ValueError):
    """The bits-per-weight target cannot be met with the candidate specs."""


@attrs.frozen
class LayerOptions:
    """What one layer may become: ``options`` are ``(stored bits, predicted error, spec)``."""

    path: str
    n_params: int
    options: tuple[tuple[float, float, QuantSpec], ...]


def storage_bits(spec: QuantSpec, n_params: int, scale_bits: int) -> int:
    """Bits MLX stores for ``n_params`` weights at ``spec`` (scales, and biases for affine, in
    ``scale_bits``-wide floats; MLX's float formats keep one 8-bit scale per group)."""
    groups = n_params // spec.group_size
    if spec.mode == "affine":
        return n_params * spec.bits + 2 * groups * scale_bits
    return n_params * spec.bits + 8 * groups


def _hull(options: Sequence[tuple[float, float, QuantSpec]]) -> list[tuple[float, float, QuantSpec]]:
    """Cheapest-first lower convex hull of ``(cost, error)``: the options a Lagrangian can pick."""
    pts: list[tuple[float, float, QuantSpec]] = []
    for c, e, s in sorted(options, key=lambda o: (o[0], o[1])):
        if pts and e >= pts[-1][1]:
            continue  # dominated: costs at least as much, no better
        while len(pts) >= 2:
            (c1, e1, _), (c2, e2, _) = pts[-2], pts[-1]
            # drop the middle point when it lies on or above the chord from pts[-2] to (c, e)
            if (e2 - e1) * (c - c1) >= (e - e1) * (c2 - c1):
                pts.pop()
            else:
                break
        pts.append((c, e, s))
    return pts


def allocate(layers: Sequence[LayerOptions], budget_bits: float) -> dict[str, QuantSpec]:
    """One spec per layer with the least summed error whose summed cost fits ``budget_bits``.

    Greedy on each layer's lower convex hull by error reduction per extra bit (optimal for the
    Lagrangian relaxation), then single upgrades to any option that still fits, best ratio first.
    Raises :class:`BudgetError` when even the cheapest options do not fit."""
    hulls = {lo.path: _hull(lo.options) for lo in layers}
    step = {p: 0 for p in hulls}
    spent = sum(h[0][0] for h in hulls.values())
    if spent > budget_bits:
        raise BudgetError(f"the cheapest candidates need {spent:.0f} bits, over the budget of "
                          f"{budget_bits:.0f}; raise the target or add cheaper candidates")
    heap: list[tuple[float, str]] = []

    def push(path: str) -> None:
        h, i = hulls[path], step[path]
        if i + 1 < len(h):
            (c0, e0, _), (c1, e1, _) = h[i], h[i + 1]
            heapq.heappush(heap, (-(e0 - e1) / (c1 - c0), path))

    for p in hulls:
        push(p)
    while heap:
        _, p = heapq.heappop(heap)
        h, i = hulls[p], step[p]
        extra = h[i + 1][0] - h[i][0]
        if spent + extra <= budget_bits:
            spent += extra
            step[p] = i + 1
            push(p)
    choice = {p: hulls[p][step[p]] for p in hulls}
    # Leftover bits: the best single move (any option, hull or not) that still fits, repeatedly.
    by_path = {lo.path: lo for lo in layers}
    while True:
        best = None
        for p, (c0, e0, _) in choice.items():
            for c, e, s in by_path[p].options:
                if c > c0 and e < e0 and spent + c - c0 <= budget_bits:
                    ratio = (e0 - e) / (c - c0)
                    if best is None or ratio > best[0]:
                        best = (ratio, p, (c, e, s))
        if best is None:
            break
        _, p, new = best
        spent += new[0] - choice[p][0]
        choice[p] = new
    return {p: c[2] for p, c in choice.items()}


@attrs.frozen
class MixedPlan:
    """A per-layer plan: ``recipe`` to quantize with; ``specs`` per planned layer; ``errors``
    per layer and candidate (``"4b g64"`` → predicted Hessian-weighted error); ``pinned``: layers
    with a fixed spec (no calibration statistics); ``bits_per_weight``: what the quantized model
    will report (see the module docstring)."""

    recipe: Recipe
    target_bpw: float
    bits_per_weight: float
    predicted_error: float
    specs: dict[str, QuantSpec]
    errors: dict[str, dict[str, float]]
    pinned: dict[str, QuantSpec]
    reference: QuantSpec
    #: What ``errors`` are: with ``kl``/``kl-fast``/``kl-grad``, each layer's output KL (nats).
    sensitivity: str = "fisher"

    def output_kl(self) -> dict[str, float]:
        """Per planned layer, its contribution to the output KL at the spec the plan gave it
        (the model's KL to the float model with only that layer quantized, in nats per token;
        ``kl-fast``: scaled from the spec it was measured at). Empty for other sensitivities."""
        if not self.sensitivity.startswith("kl"):
            return {}
        return {p: self.errors[p][_label(s)] for p, s in self.specs.items()
                if _label(s) in self.errors.get(p, {})}

    def annotate_report(self, report: RunReport) -> int:
        """Record :meth:`output_kl` in ``report``'s layer records (``output_kl``); returns how
        many layers got a value."""
        kl = self.output_kl()
        n = 0
        for r in report.layers:
            if r.path in kl and r.expert is None:
                r.output_kl = kl[r.path]
                n += 1
        report.settings["output_kl"] = {"sensitivity": self.sensitivity,
                                        "layers": n, "total": sum(kl.values())}
        return n

    def write_into(self, out_dir: str | Path, report: RunReport) -> Path:
        """Finish the output a run of this plan wrote: the plan as ``recipe.toml`` beside it (to
        edit and re-run), and each layer's output KL in its ``report`` (re-written there when
        any was measured). Returns the recipe file."""
        path = Path(out_dir) / "recipe.toml"
        path.write_text(self.to_toml())
        if self.annotate_report(report):  # each layer's output KL, where measured
            report.write(out_dir)
        return path

    def to_toml(self) -> str:
        spread = Counter(f"{s.bits}b g{s.group_size}" for s in self.specs.values())
        header = (
            f"Mixed-precision plan written by quantkit for a target of {self.target_bpw:g} bits "
            f"per weight\n(planned: {self.bits_per_weight:.4f}, counting scales, biases, "
            "full-precision layers and embeddings).\n"
            "Layers: " + ", ".join(f"{k} ×{v}" for k, v in sorted(spread.items())) + ".\n"
            "Edit freely and re-run with `quantkit quantize MODEL -o OUT --recipe THIS_FILE`."
        )
        return self.recipe.to_toml(header)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_bpw": self.target_bpw, "bits_per_weight": self.bits_per_weight,
            "predicted_error": self.predicted_error,
            "reference": attrs.asdict(self.reference),
            "specs": {k: attrs.asdict(v) for k, v in self.specs.items()},
            "pinned": {k: attrs.asdict(v) for k, v in self.pinned.items()},
            "errors": self.errors, "recipe": self.recipe.to_dict(),
            "sensitivity": self.sensitivity,
        }


def _label(spec: QuantSpec) -> str:
    return f"{spec.bits}b g{spec.group_size}" + ("" if spec.mode == "affine" else f" {spec.mode}")


@attrs.frozen
class _Measured(Quantizer):
    """Wraps a strategy that needs no calibration so that the profiling walk still collects its
    layer's Hessian (to weight its errors)."""

    name: ClassVar[str] = "measured"
    inner: Quantizer

    def quantize(self, weight, spec, stats, storage_dtype=mx.float32):
        return self.inner.quantize(weight, spec, stats, storage_dtype)


@attrs.define
class _Profiler(WalkHook):
    """Follows a walk (a :class:`~quantkit.pipeline.hooks.WalkHook`): before each layer is
    quantized at its planned (reference) spec, records the Hessian-weighted error its strategy
    reaches at every candidate spec."""

    candidates: tuple[QuantSpec, ...] = DEFAULT_CANDIDATES
    #: The walk's fallback strategy (used where a candidate cannot be factorized).
    fallback: Quantizer = attrs.field(factory=RTNQuantizer)
    #: Per layer, weights of its output features (``None``: all 1, the plain output error).
    weights: dict[str, np.ndarray] | None = None
    errors: dict[str, dict[QuantSpec, float]] = attrs.field(factory=dict)
    plans: dict[str, LayerPlan] = attrs.field(factory=dict)
    #: ``(path, dequantized weight) -> output KL`` of the float model with that one layer
    #: replaced (``None``: not measured); called at every candidate, or only at ``reference``
    #: when ``kl_all`` is false.
    kl_probe: Callable[[str, mx.array], float] | None = None
    kl_all: bool = True
    reference: QuantSpec | None = None
    kl: dict[str, dict[QuantSpec, float]] = attrs.field(factory=dict)
    #: Per layer, the gradient of the output KL in the low-bit model (``kl-grad``).
    kl_grads: dict[str, np.ndarray] | None = None
    #: Whether the walk keeps every float layer (to put them back into the model afterwards);
    #: a streamed measurement needs only their shapes (:class:`~quantkit.pipeline.hooks.WalkHook`).
    keeps_float_layers: bool = True

    def planned(self, plans: dict[str, LayerPlan]) -> None:
        for p in plans.values():
            if not p.quantizer.needs_hessian:
                p.quantizer = _Measured(p.quantizer)
        self.plans = dict(plans)  # the walker drops its plans (and the original layers) as it goes

    def before_solve(self, p: LayerPlan, stats: HessianStats | None) -> None:
        weight = p.handler.weight(p.module)
        if stats is not None and stats.n_tokens > 0 and weight.ndim == 2:
            w = weight.astype(mx.float32)
            h = np.asarray(stats.h, dtype=np.float64)
            w64 = np.asarray(w, dtype=np.float64)
            f = None if self.weights is None or p.path not in self.weights \
                else 0.5 * self.weights[p.path]
            errs = {}
            for spec in self.candidates:
                if weight.shape[-1] % spec.group_size:
                    continue
                try:
                    res = p.quantizer.quantize(w, spec, stats, p.storage_dtype)
                except FactorizationError:
                    res = self.fallback.quantize(w, spec, stats, p.storage_dtype)
                d = w64 - np.asarray(res.dequantized, dtype=np.float64)
                rows = np.einsum("ij,ij->i", d @ h, d)
                errs[spec] = float(rows.sum() if f is None else rows @ f)
                if self.kl_probe is not None and (self.kl_all or spec == self._kl_spec(weight)):
                    self.kl.setdefault(p.path, {})[spec] = self.kl_probe(p.path, res.dequantized)
                if self.kl_grads is not None and p.path in self.kl_grads:
                    # first order, linearised in the low-bit model: KL(Q_s) − KL(W) ≈ g·(Q_s − W)
                    self.kl.setdefault(p.path, {})[spec] = float(np.sum(self.kl_grads[p.path] * -d))
            self.errors[p.path] = errs

    def _kl_spec(self, weight: mx.array) -> QuantSpec | None:
        """The one candidate ``kl-fast`` measures a layer at: the reference, else the fitting
        candidate closest to it in bits per weight."""
        fits = [s for s in self.candidates if weight.shape[-1] % s.group_size == 0]
        if not fits or self.reference is None:
            return None
        ref = self.reference
        return min(fits, key=lambda s: (s != ref, abs(s.bits_per_weight(16) - ref.bits_per_weight(16))))


class KLProbe:
    """The output KL(float ‖ float with one layer's weight replaced), mean over the next-token
    positions of ``tokens``. Holds its own copy of the model (``model`` is not touched) and the
    float logits of every batch; each probe runs the copy one decoder block at a time over all
    batches (from block 0's inputs, captured once), then the head.

    ``spill``: stream the copy. ``model`` is then the probe's own, loaded lazily for it alone
    (not copied: a copy would share, and so materialize, the original's lazy loads); its
    decoder blocks are written once, a block at a time, to files in the directory ``spill``
    and read back lazily for each use and dropped after it, so one block's weights are
    resident at a time instead of the whole model."""

    def __init__(self, model: nn.Module, tokens: mx.array, batch_size: int = 4,
                 dtype: mx.Dtype | None = mx.float32, spill: Path | None = None) -> None:
        self.model = model if spill is not None else copy.deepcopy(model)
        self.dtype = dtype
        self.blocks = decoder_blocks(self.model)
        names = {id(m): p for p, m in self.model.named_modules()}
        self.block_paths = [names[id(b)] for b in self.blocks]
        self.files: list[Path] | None = None
        if spill is not None:
            self.files = []
            for i, (block, path) in enumerate(zip(self.blocks, self.block_paths)):
                check("plan")
                self.files.append(spill / f"probe-block-{i:04d}.safetensors")
                flat: list[tuple[str, mx.array]] = tree_flatten(block.parameters())  # type: ignore[assignment]
                mx.save_safetensors(str(self.files[-1]), {f"{path}.{k}": v for k, v in flat})
                reload_lazily(self.model, self.files[-1])
        if dtype is not None:
            self.model.set_dtype(dtype)
        self.modules = dict(tree_flatten(self.model.leaf_modules(), is_leaf=nn.Module.is_module))
        self.batches = [tokens[i : i + batch_size, :-1] for i in range(0, tokens.shape[0], batch_size)]
        self.inputs, self.args = capture(self.model, self.blocks, self.block_paths, self.batches)
        self.reference = list(self._logits())
        mx.eval(self.reference)
        self.calls = 0

    def _logits(self):
        """The copy's logits, batch by batch (lazy): its blocks run one at a time over every
        batch (with ``spill``, each block read back for it and dropped after it), then the
        final norm and head on the last block's outputs."""
        hidden = list(self.inputs)
        for i, block in enumerate(self.blocks):
            check("plan")  # a place to stop at every planning block (quantkit.interrupt)
            hidden = [block(x, *a, **kw) for x, (a, kw) in zip(hidden, self.args[i])]
            mx.eval(hidden)
            if self.files is not None:
                reload_lazily(self.model, self.files[i])
                if self.dtype is not None:
                    block.set_dtype(self.dtype)
        with replaying(self.model, self.blocks, self.block_paths, hidden):
            for batch in self.batches:
                yield self.model(batch)

    def __call__(self, path: str, weight: mx.array) -> float:
        from .evaluate import logit_stats

        module = self.modules[path]
        old = module.weight
        module.weight = weight.astype(old.dtype)
        try:
            total, count = 0.0, 0
            for j, logits in enumerate(self._logits()):  # (run to its end: it puts the blocks back)
                ref = self.reference[j]
                check("plan")  # a place to stop at every planning batch (quantkit.interrupt)
                kl = logit_stats(ref, logits)["kl"]
                total += cast(float, mx.sum(kl).item())
                count += kl.size
        finally:
            module.weight = old
        self.calls += 1
        return total / count


def kl_gradients(model: nn.Module, tokens: mx.array, paths: Sequence[str],
                 low: Sequence[QuantSpec], batch_size: int = 4,
                 dtype: mx.Dtype | None = mx.float32) -> dict[str, np.ndarray]:
    """Per layer in ``paths``, the gradient of the mean next-token KL(float ‖ low-bit model)
    with respect to its weight, taken in the low-bit model: a copy of ``model`` with every
    layer of ``paths`` rounded to nearest at the first spec of ``low`` its width allows (as
    mlx-lm's ``dynamic_quant`` measures its sensitivities). ``model`` is not changed."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.set_dtype(dtype)
    q = copy.deepcopy(ref)
    modules = dict(tree_flatten(q.leaf_modules(), is_leaf=nn.Module.is_module))
    q.freeze()
    used = []
    for path in paths:
        m = modules[path]
        w = m.weight
        spec = next((s for s in low if w.ndim == 2 and w.shape[-1] % s.group_size == 0), None)
        if spec is None:
            continue
        packed = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        m.weight = mx.dequantize(*packed, group_size=spec.group_size, bits=spec.bits,
                                 mode=spec.mode).astype(w.dtype)
        m.unfreeze(keys=["weight"], recurse=False)
        used.append(path)

    def loss(params, batch, target):
        q.update(params)
        logits = q(batch).astype(mx.float32)
        log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        log_p = target - mx.logsumexp(target, axis=-1, keepdims=True)
        return mx.sum(mx.exp(log_p) * (log_p - log_q))

    grad = mx.grad(loss)
    total: dict[str, Any] | None = None
    count = 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size, :-1]
        target = ref(batch).astype(mx.float32)
        g = grad(q.trainable_parameters(), batch, target)
        total = g if total is None else tree_map(lambda a, b: a + b, total, g)
        mx.eval(total)
        count += batch.size
    flat = dict(tree_flatten(total or {}))
    return {p: np.asarray(flat[f"{p}.weight"], dtype=np.float64) / count
            for p in used if f"{p}.weight" in flat}


class _Shift(Wrapper):
    """Stands in for the first decoder block while output gradients are gathered: adds the
    scalar ``delta`` (zero) to its input, so differentiating by ``delta`` runs the backward
    pass through every block and the output head."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.delta = mx.array(0.0)

    def __call__(self, x, *args, **kwargs):
        return self.module(x + self.delta, *args, **kwargs)


class _Probe(Wrapper):
    """Wraps a layer: an identity on its output whose backward adds the squared output
    gradient, summed over tokens, to ``sums`` (one entry per backward pass)."""

    def __init__(self, module: nn.Module, sums: list) -> None:
        super().__init__(module)
        self.sums = sums

        @mx.custom_function
        def probe(y):
            return y

        @probe.vjp
        def _(primals, cotangent, output):
            g = cotangent.astype(mx.float32)
            self.sums.append(mx.sum(g * g, axis=tuple(range(g.ndim - 1))))
            return cotangent

        self._probe = probe

    def __call__(self, x, *args, **kwargs):
        if isinstance(self.module, nn.Embedding):
            return self.module(x)
        return self._probe(self.module(x, *args, **kwargs))

    def as_linear(self, x):
        return self._probe(self.module.as_linear(x))


def output_fisher(model: nn.Module, tokens: mx.array, paths: Sequence[str],
                  batch_size: int = 4) -> dict[str, np.ndarray]:
    """Per output feature of each layer in ``paths``, the mean over tokens of the squared
    gradient of the next-token negative log-likelihood with respect to that output (the
    diagonal of the empirical Fisher of the layer's outputs). Run on the full-precision model;
    for a tied embedding, the output head's logits. ``model`` is left unchanged."""
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    sums: dict[str, list] = {p: [] for p in paths}
    blocks = decoder_blocks(model)
    first = blocks[0]
    block_path = next(p for p, m in model.named_modules() if m is first)
    model.update_modules(tree_unflatten([(p, _Probe(modules[p], sums[p])) for p in paths]))
    shift = _Shift(first)
    model.update_modules(tree_unflatten([(block_path, shift)]))

    def nll(delta, batch):
        shift.delta = delta
        logits = model(batch[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")

    grad = mx.grad(nll)
    n_tokens = 0
    try:
        for i in range(0, tokens.shape[0], batch_size):
            check("plan")  # reliab: a place to stop at every planning batch
            batch = tokens[i : i + batch_size]
            mx.eval(grad(mx.array(0.0), batch), [s[-1] for s in sums.values() if s])
            for s in sums.values():  # keep one running sum per layer
                if len(s) > 1:
                    s[:] = [s[0] + s[1]]
                    mx.eval(s[0])
            n_tokens += batch[:, 1:].size
    finally:
        model.update_modules(tree_unflatten([(block_path, first)]))
        model.update_modules(tree_unflatten([(p, modules[p]) for p in paths]))
    return {p: np.asarray(s[0], dtype=np.float64) / n_tokens for p, s in sums.items() if s}


def _reference_spec(candidates: Sequence[QuantSpec], target_bpw: float, scale_bits: int) -> QuantSpec:
    return min(candidates, key=lambda s: (abs(s.bits_per_weight(scale_bits) - target_bpw), -s.bits))


@attrs.frozen
class Sensitivity:
    """What the profiling walk measured: per layer, the stored bits and predicted error of each
    candidate (``layers``), plus the budget's fixed part. :meth:`plan` allocates for a target;
    one measurement serves any number of targets."""

    layers: tuple[LayerOptions, ...]
    fixed_bits: int  # parameters outside the planned weights, and pinned layers
    total_params: int
    pinned: dict[str, QuantSpec]
    paths: tuple[str, ...]
    base: Recipe
    reference: QuantSpec
    sensitivity: str

    def plan(self, target_bpw: float) -> MixedPlan:
        check_settings(target_bpw=target_bpw)
        cheapest = (self.fixed_bits + sum(min(c for c, _, _ in lo.options) for lo in self.layers)
                    ) / self.total_params
        if target_bpw < cheapest:
            raise BudgetError(
                f"--target-bpw {target_bpw:g} cannot be met: the smallest reachable is "
                f"{math.ceil(cheapest * 1000) / 1000:.3f} bits per weight (every planned layer at its "
                "cheapest candidate, the rest as it is); raise the target to at least that")
        specs = allocate(self.layers, target_bpw * self.total_params - self.fixed_bits)
        cost = {(lo.path, s): (c, e) for lo in self.layers for c, e, s in lo.options}
        used = self.fixed_bits + sum(cost[p, s][0] for p, s in specs.items())
        return MixedPlan(
            recipe=_plan_recipe(self.base, self.paths, {**self.pinned, **specs}),
            target_bpw=target_bpw, bits_per_weight=used / self.total_params,
            predicted_error=sum(cost[p, s][1] for p, s in specs.items()), specs=specs,
            errors={lo.path: {_label(s): e for _, e, s in lo.options} for lo in self.layers},
            pinned=self.pinned, reference=self.reference, sensitivity=self.sensitivity,
        )


def plan_mixed_precision(
    model: nn.Module, tokens: mx.array, target_bpw: float, *,
    candidates: Sequence[QuantSpec] = DEFAULT_CANDIDATES, recipe: Recipe | None = None,
    sensitivity: str = "kl-fast", fisher_samples: int = 16, batch_size: int = 8,
    dtype: str | None = "float32", progress: Progress | None = None,
    reload: Callable[[], nn.Module] | None = None,
) -> MixedPlan:
    """Choose per-layer bits and group sizes for ``model`` meeting ``target_bpw``:
    :func:`measure_sensitivity` then :meth:`Sensitivity.plan`. The profiling walk quantizes at
    the candidate whose cost is closest to ``target_bpw``. ``reload``: stream the measurement
    (see :func:`measure_sensitivity`)."""
    return measure_sensitivity(
        model, tokens, candidates=candidates, recipe=recipe, sensitivity=sensitivity,
        fisher_samples=fisher_samples, batch_size=batch_size, dtype=dtype, progress=progress,
        reference_bpw=target_bpw, reload=reload,
    ).plan(target_bpw)


def measure_sensitivity(
    model: nn.Module, tokens: mx.array, *,
    candidates: Sequence[QuantSpec] = DEFAULT_CANDIDATES, recipe: Recipe | None = None,
    sensitivity: str = "kl-fast", fisher_samples: int = 16, batch_size: int = 8,
    dtype: str | None = "float32", progress: Progress | None = None,
    reference_bpw: float = 4.0, reload: Callable[[], nn.Module] | None = None,
) -> Sensitivity:
    """Every layer's predicted error at every candidate spec, from one sequential profiling walk
    over calibration ``tokens`` that quantizes at the candidate closest to ``reference_bpw``.

    ``recipe`` is the base: it decides each layer's strategy (and its options) and which layers
    are skipped; its bits and group sizes are replaced by the plan. Layers no calibration
    activation reaches keep the base spec and are counted at it. ``model`` is left as it was
    (the profiling walk's quantized layers are swapped back out).

    ``sensitivity``: ``"kl-fast"`` is the default (it allocated best on stories260K-pad192,
    docs/results-mixed.md). ``"fisher"`` weights each output feature's error by the mean
    squared gradient of the calibration loss with respect to it (:func:`output_fisher`, from
    the first ``fisher_samples`` sequences), so errors are second-order estimates of the loss
    increase and comparable across layers; ``"output"`` sums the plain output errors;
    ``"kl"`` measures the output KL(float ‖ model) on the first ``fisher_samples`` sequences
    with only that layer quantized (:class:`KLProbe`), at every candidate (one forward pass of
    those sequences per layer and candidate); ``"kl-fast"`` measures it at one candidate per
    layer (the reference) and scales the layer's plain output errors to it; ``"kl-grad"`` takes
    one gradient of that KL in the model rounded to nearest at the cheapest candidate
    (:func:`kl_gradients`, as mlx-lm's ``dynamic_quant`` does) and predicts each candidate's
    KL to first order, ``g·(Q_s(W) − W)`` (one backward pass in all).

    ``reload``: stream the measurement, for a ``model`` loaded lazily from a directory
    (:func:`quantkit.io.load_model` with ``lazy=True``) that is dropped afterwards: ``reload()``
    loads another lazy instance of it for the KL probe (``kl``, ``kl-fast``: streamed too, see
    :class:`KLProbe`), and the profiling walk writes each finished block to a scratch directory
    (``TMPDIR``) and frees its float weights, as the quantization walk does, so one block's
    weights are resident at a time. ``model`` is then left with its layers quantized, not
    restored. ``fisher`` and ``kl-grad`` take gradients through the whole model: they hold it."""
    if sensitivity not in SENSITIVITIES:
        raise BudgetError(f"sensitivity {sensitivity!r} is unknown; use one of {list(SENSITIVITIES)}")
    base = recipe or Recipe()
    candidates = tuple(candidates)
    if not candidates:
        raise BudgetError("no candidate specs given")
    orig_dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    total_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    scale_bits = 16 if any(v in (mx.float16, mx.bfloat16) for v in orig_dtypes.values()) else 32
    reference = _reference_spec(candidates, reference_bpw, scale_bits)
    profiler = _Profiler(candidates=candidates, reference=reference, kl_all=sensitivity == "kl",
                         keeps_float_layers=reload is None)
    walker = ModelWalker(
        recipe=base.with_default(bits=reference.bits, group_size=reference.group_size),
        batch_size=batch_size, dtype=dtype, progress=progress, hooks=(profiler,),
    )
    profiler.fallback = walker.fallback
    with tempfile.TemporaryDirectory(prefix="quantkit-plan-") if reload is not None \
            else contextlib.nullcontext() as scratch:
        spill = None if scratch is None else Path(scratch)
        if sensitivity in ("kl", "kl-fast"):
            profiler.kl_probe = KLProbe(model if reload is None else reload(), tokens[:fisher_samples],
                                        dtype=None if dtype is None else DTYPES[dtype], spill=spill)
        param_bits = _profile(model, tokens, walker, profiler, sensitivity, candidates, scale_bits,
                              fisher_samples, dtype, orig_dtypes, spill)
        profiler.kl_probe = None  # (its copy of the model and its scratch files go)

    # Fixed cost: every parameter not in a planned layer's weight, at its dtype.
    planned_weights = {f"{p.path}.weight" for p in profiler.plans.values()}
    fixed_bits = sum(bits for k, bits in param_bits.items() if k not in planned_weights)
    layers, pinned = [], {}
    for path, p in profiler.plans.items():
        weight = p.handler.weight(p.module)  # (streamed: a shell, its shape without values)
        sbits = 8 * orig_dtypes.get(f"{path}.weight", weight.dtype).size
        errs = profiler.errors.get(path)
        if errs and sensitivity in ("kl", "kl-fast", "kl-grad"):
            errs = _kl_errors(errs, profiler.kl.get(path, {}))
        if not errs:
            pinned[path] = base.resolve(path)[1].spec.fitted_to(weight.shape[-1]) or p.spec
            fixed_bits += storage_bits(pinned[path], weight.size, sbits)
            continue
        layers.append(LayerOptions(path, weight.size, tuple(
            (storage_bits(s, weight.size, sbits), e, s) for s, e in errs.items()
        )))
    return Sensitivity(layers=tuple(layers), fixed_bits=fixed_bits, total_params=total_params,
                       pinned=pinned, paths=tuple(profiler.plans), base=base, reference=reference,
                       sensitivity=sensitivity)


def _profile(model: nn.Module, tokens: mx.array, walker: ModelWalker, profiler: _Profiler,
             sensitivity: str, candidates: Sequence[QuantSpec], scale_bits: int, fisher_samples: int,
             dtype: str | None, orig_dtypes: dict[str, mx.Dtype], spill: Path | None) -> dict[str, int]:
    """The profiling walk (after the gradients ``kl-grad`` and ``fisher`` need); returns the
    bits of every parameter of the float model. With ``spill`` (streamed) the walk's finished
    blocks go there and ``model`` keeps its quantized layers; else it is put back as it was."""
    if sensitivity == "kl-grad":
        low = sorted(candidates, key=lambda s: (s.bits_per_weight(scale_bits), -s.group_size))
        profiler.kl_grads = kl_gradients(model, tokens[:fisher_samples], list(walker.plan(model)),
                                       low, dtype=None if dtype is None else DTYPES[dtype])
    if sensitivity == "fisher":
        paths = list(walker.plan(model))
        if dtype is not None:
            model.set_dtype(DTYPES[dtype])
        try:
            profiler.weights = output_fisher(model, tokens[:fisher_samples], paths)
        finally:
            restore_dtypes(model, orig_dtypes)
    param_bits = {k: v.nbytes * 8 for k, v in tree_flatten(model.parameters())}
    if spill is not None:
        walker.run(model, tokens, checkpoint=BlockFiles(spill))
        return param_bits
    try:
        walker.run(model, tokens)
    finally:
        model.update_modules(tree_unflatten([(p.path, p.module) for p in profiler.plans.values()]))
        restore_dtypes(model, orig_dtypes)
    return param_bits


def _kl_errors(errors: dict[QuantSpec, float], kl: dict[QuantSpec, float]) -> dict[QuantSpec, float]:
    """Per candidate, the layer's output KL: measured where it was, else the KL measured at one
    candidate scaled by the ratio of the two candidates' output errors (``kl-fast``)."""
    if not kl:
        return {}
    if len(kl) == len(errors):
        return dict(kl)
    (at, measured), = kl.items()
    scale = measured / max(errors[at], 1e-30)
    return {s: kl.get(s, e * scale) for s, e in errors.items()}


def _plan_recipe(base: Recipe, plans: Sequence[str], specs: dict[str, QuantSpec]) -> Recipe:
    """The base recipe's default (strategy and options) at the most common planned spec, plus
    one exact-path rule for each layer that differs from it; the base's skip rules come first,
    as they were."""
    default = base.default.to_dict()
    default.pop("match")
    if base.default.skip:
        default = {"strategy": "gptq"}
    common = Counter((s.bits, s.group_size, s.mode) for s in specs.values()).most_common(1)
    if common:
        default.update(zip(("bits", "group_size", "mode"), common[0][0]))
    rules: list[dict[str, Any]] = [r.to_dict() for r in base.rules if r.skip]
    top = Recipe.from_dict({"default": default})
    for path in plans:
        rule = base.resolve(path)[1]
        spec = specs[path]
        want = {"strategy": rule.strategy, **dict(rule.options)}
        have = {"strategy": top.default.strategy, **dict(top.default.options)}
        entry: dict[str, Any] = {"match": _exact(path)}
        if want != have:
            entry.update(want)
        if spec != top.default.spec:
            entry.update(bits=spec.bits, group_size=spec.group_size)
            if spec.mode != top.default.spec.mode:
                entry["mode"] = spec.mode
        if len(entry) > 1:
            rules.append(entry)
    kept = {k: v for k, v in base.to_dict().items()
            if k in ("plugins", "transform", "optimizer", "moe", "embedding", "distill")}
    return Recipe.from_dict({**kept, "default": default, "rules": rules})


def _exact(path: str) -> str:
    """A glob matching exactly ``path`` (module paths hold no glob characters but ``[``)."""
    return path if not any(ch in path for ch in "*?[") else "re:" + re.escape(path)


def plan_directory(
    model_dir, target_bpw: float, recipe: Recipe | None = None, *, calibration=None,
    num_samples: int = 128, seq_len: int = 512, seed: int = 0, dtype: str | None = "float32",
    batch_size: int = 8, candidates: Sequence[QuantSpec] = DEFAULT_CANDIDATES,
    sensitivity: str = "kl-fast", progress: Progress | None = None,
) -> MixedPlan:
    """:func:`plan_mixed_precision` for a model directory, with the same calibration tokens
    :func:`quantkit.api.quantize_directory` draws for the same settings."""
    from .calibration import calibration_tokens
    from .io import load_model

    check_settings(seed=seed, target_bpw=target_bpw)  # before any work
    # Read lazily and streamed, as the quantization walk is: the weights stay on disk until
    # a block uses them (the NaN/Inf check reads the files a chunk at a time).
    model, tokenizer, _ = load_model(model_dir, lazy=True)
    tokens = calibration_tokens(tokenizer, calibration, num_samples, seq_len, seed)
    return plan_mixed_precision(
        model, tokens, target_bpw, candidates=candidates, recipe=recipe, sensitivity=sensitivity,
        batch_size=batch_size, dtype=dtype, progress=progress,
        reload=lambda: load_model(model_dir, lazy=True, check_finite=False)[0])


def parse_candidates(text: str) -> tuple[QuantSpec, ...]:
    """``"2:64,3:64,4:32"`` (bits:group_size, comma-separated) → specs."""
    specs = []
    for item in text.split(","):
        bits, _, group = item.strip().partition(":")
        try:
            specs.append(QuantSpec(int(bits), int(group or 64)))
        except ValueError as exc:
            raise BudgetError(f"candidate {item.strip()!r}: {exc}; write bits:group_size") from None
    return tuple(specs)


__all__ = [
    "DEFAULT_CANDIDATES", "SENSITIVITIES", "BudgetError", "KLProbe", "LayerOptions", "MixedPlan", "Sensitivity",
    "allocate", "kl_gradients", "measure_sensitivity", "output_fisher",
    "parse_candidates", "plan_directory", "plan_mixed_precision", "storage_bits",
]
