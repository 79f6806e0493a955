"""Architecture knowledge as data: one :class:`ArchSpec` per mlx-lm model family.

Paths are relative to a decoder block. Nothing here imports the rest of quantkit except
:mod:`quantkit.errors`, so any module may import it.
"""

from __future__ import annotations

import attrs

from ..errors import ModelLoadError


@attrs.frozen
class ScaleGroup:
    """Linears that read one input, and the module that produces that input.

    ``source``: a norm (``kind = "norm"``: its output is ``normalize(x) * (weight + offset)``)
    or a linear (``kind = "linear"``: its output rows feed ``targets``' input columns).
    ``targets``: the linears reading ``source``'s output (input channels scale together).
    ``scope``: the submodule whose output measures a scaling's error (e.g. ``"self_attn"``,
    ``"mlp"``); ``None``: the targets' own outputs.
    """

    source: str
    targets: tuple[str, ...]
    kind: str = attrs.field(default="norm", validator=attrs.validators.in_(("norm", "linear")))
    offset: float = 0.0
    scope: str | None = None


@attrs.frozen
class ArchSpec:
    """One mlx-lm model family.

    ``blocks``: attribute path from the model to its list of decoder blocks.
    ``shared_inputs``: groups of linears that read the very same input (their Hessians are one).
    ``scale_groups``: norm→linear and linear→linear mappings for activation-aware scaling.
    """

    model_types: tuple[str, ...]
    blocks: str = "model.layers"
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = ()


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    shared_inputs=(_ATTN, _MLP),
    scale_groups=(
        ScaleGroup("input_layernorm", _ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", _MLP, scope="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {t: spec for spec in (LLAMA,) for t in spec.model_types}


def arch_for(model_type: str) -> ArchSpec:
    """The table of ``model_type``; a one-line error naming it when quantkit has none."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"model_type {model_type!r} has no architecture table in quantkit (known: {known}); "
            "add an ArchSpec in quantkit/arch/ or use a supported model")
    return spec
