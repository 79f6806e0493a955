"""A model's own ``quant_predicate``: the precision mlx-lm asks for on some of its layers.

mlx-lm models may define ``quant_predicate(path, module)``, returning ``False`` (keep the layer
in full precision), ``True`` (use the requested settings) or a dict of ``to_quantized``
arguments — e.g. Qwen3-MoE's router ``mlp.gate`` at 8 bits, group 64. ``mlx_lm.convert`` obeys
it; so does quantkit, for every layer no explicit recipe rule claims (an explicit rule is the
user's word and wins). A dict without ``mode`` means affine, as in ``to_quantized``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.nn as nn

from .specs import QuantSpec

Predicate = Callable[[str, nn.Module], Any]

#: Keys of a predicate's dict that a :class:`QuantSpec` holds; others (``global_scale``) are
#: not supported and reported.
SPEC_KEYS = ("bits", "group_size", "mode")


def model_predicate(model: nn.Module) -> Predicate | None:
    """The model's ``quant_predicate``, or ``None`` when it has none."""
    try:
        return getattr(model, "quant_predicate", None)
    except AttributeError:  # a property that reaches for a missing attribute
        return None


def apply_predicate(
    predicate: Predicate, path: str, module: nn.Module, spec: QuantSpec
) -> tuple[QuantSpec | None, str | None]:
    """``(spec to use, note)``: ``spec`` unchanged when the predicate says ``True``; ``None``
    when it says ``False``; the predicate's settings when it gives a dict."""
    decision = predicate(path, module)
    if decision is False:
        return None, "model's quant_predicate keeps this layer in full precision"
    if not isinstance(decision, dict):
        return spec, None
    settings = {"bits": spec.bits, "group_size": spec.group_size, "mode": "affine"}
    settings.update({k: v for k, v in decision.items() if k in SPEC_KEYS})
    wanted = QuantSpec.from_config(settings)
    note = f"model's quant_predicate: {wanted.bits}-bit, group {wanted.group_size}, {wanted.mode}"
    ignored = sorted(set(decision) - set(SPEC_KEYS))
    if ignored:
        note += f" (ignored: {', '.join(ignored)})"
    return wanted, note
