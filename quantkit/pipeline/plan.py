"""What happens to each layer: the plan made for it before the walk (:func:`plan_layers`), the
cost estimate that spreads layers over processes (:func:`layer_cost`), and what the output's
``config.json`` says about it afterwards (:func:`quantization_config`)."""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..predicate import apply_predicate, model_predicate
from ..quantizers import Quantizer
from ..recipe import Recipe, Rule
from ..registry import LayerHandler, LayerRegistry
from ..report import LayerRecord, RunReport
from ..specs import QuantSpec


@attrs.define
class LayerPlan:
    path: str
    module: nn.Module
    handler: LayerHandler
    rule_index: int | None
    rule: Rule
    spec: QuantSpec
    quantizer: Quantizer
    storage_dtype: mx.Dtype
    note: str | None = None

    @property
    def needs_stats(self) -> bool:
        """Calibrated in the block's shared forward pass (expert layers have their own)."""
        return self.quantizer.needs_hessian and not self.handler.per_expert

    @property
    def per_expert(self) -> bool:
        """Calibrated one Hessian per expert, in expert-batch passes (see quantkit.pipeline.expert_layers)."""
        return self.quantizer.needs_hessian and self.handler.per_expert


def layer_cost(plan: LayerPlan) -> float:
    """Rough cost of quantizing one layer: GPTQ's column loop, ``out·in²`` per matrix, when it
    uses a Hessian (the ``in³`` factorization runs in LAPACK and weighs less); ``out·in``
    without (round to nearest)."""
    w = plan.handler.weight(plan.module)
    return float(w.size * w.shape[-1] if plan.needs_stats else w.size)


def plan_layers(model: nn.Module, recipe: Recipe, registry: LayerRegistry,
                report: RunReport | None = None, *, use_model_predicate: bool = True
                ) -> dict[str, LayerPlan]:
    """Decide, for every leaf module of ``model``, what happens to it: the ``registry``'s handler
    for its exact class, the ``recipe``'s first matching rule (or, where none matches and
    ``use_model_predicate``, the model's own ``quant_predicate``), the spec fitted to its width,
    one quantizer per rule. Layers left in full precision go to ``report`` with the reason."""
    plans: dict[str, LayerPlan] = {}
    quantizers: dict[int | None, Quantizer] = {}
    predicate = model_predicate(model) if use_model_predicate else None
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        handler = registry.get(module)
        if handler is None:
            if hasattr(module, "to_quantized") and report is not None:
                report.add(LayerRecord(
                    path, type(module).__name__, "skipped",
                    reason=f"no handler registered for class {type(module).__name__}",
                ))
            continue
        weight = handler.weight(module)
        record = LayerRecord(path, type(module).__name__, "skipped", n_params=weight.size)
        index, rule = recipe.resolve(path)
        record.rule = index
        if rule.skip:
            record.reason = "recipe: skip" + (f" (rule {index + 1})" if index is not None else "")
            if report is not None:
                report.add(record)
            continue
        spec, model_note = rule.spec, None
        if predicate is not None and index is None:
            spec, model_note = apply_predicate(predicate, path, module, spec)
            if spec is None:
                record.reason = model_note
                if report is not None:
                    report.add(record)
                continue
        wanted = spec
        spec = spec.fitted_to(weight.shape[-1])
        if spec is None:
            record.reason = (
                f"input width {weight.shape[-1]} is not divisible by any group size "
                f"allowed in mode {wanted.mode!r} {list(wanted.allowed_group_sizes())}"
            )
            if report is not None:
                report.add(record)
            continue
        note = model_note
        if spec.group_size != wanted.group_size:
            note = "; ".join(n for n in (note, (
                f"group size {wanted.group_size} does not divide width "
                f"{weight.shape[-1]}: used {spec.group_size}")) if n)
        if index not in quantizers:
            quantizers[index] = rule.make_quantizer()
        plans[path] = LayerPlan(path, module, handler, index, rule, spec,
                                handler.adapt(quantizers[index]), weight.dtype, note)
    return plans


def rebind(model: nn.Module, plans: list[LayerPlan]) -> None:
    """Point ``plans`` at the model's current layers (a transform may have swapped some)."""
    current = dict(model.named_modules())
    for p in plans:
        p.module = current[p.path]


def quantization_config(recipe: Recipe, report: RunReport) -> dict[str, Any]:
    """``config["quantization"]``: the default plus a full dict for every layer that differs
    from it, ``False`` for every quantizable layer left in full precision."""
    default = recipe.default.spec
    config: dict[str, Any] = default.to_config()
    for r in report.layers:
        if r.status == "skipped":
            config[r.path] = False
        elif (r.bits, r.group_size, r.mode) != (default.bits, default.group_size, default.mode) \
                or recipe.default.skip:
            config[r.path] = {"group_size": r.group_size, "bits": r.bits, "mode": r.mode}
    return config
