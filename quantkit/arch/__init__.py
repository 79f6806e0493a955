"""Architecture knowledge as data: one :class:`ArchSpec` per mlx-lm model family.

One module per family (``llama.py`` also covers mistral, qwen2 and qwen3); :data:`ARCHITECTURES`
maps each mlx-lm ``model_type`` to its table. Paths in a table are relative to a decoder block.
This package imports nothing from quantkit except :mod:`quantkit.errors`, so any module may
import it.

- :func:`arch_for` — the table of a model type (a one-line error naming an unknown one);
- :func:`decoder_blocks` — a model's list of decoder blocks;
- :func:`shared_input_groups` — which of some layers read the very same input as another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ModelLoadError
from .deepseek_v3 import DEEPSEEK_V3
from .gemma3 import GEMMA3, GEMMA3_TEXT
from .glm4_moe import GLM4_MOE
from .llama import LLAMA
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .phi3 import PHI3
from .qwen2_moe import QWEN2_MOE
from .qwen3_moe import QWEN3_MOE
from .spec import ArchSpec, ScaleGroup

TABLES: tuple[ArchSpec, ...] = (LLAMA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GEMMA3_TEXT, GEMMA3,
                                PHI3, DEEPSEEK_V3, GLM4_MOE)

ARCHITECTURES: dict[str, ArchSpec] = {t: spec for spec in TABLES for t in spec.model_types}

#: What a model of a family quantkit has no table for still gets: decoder blocks at
#: ``model.layers`` (every mlx-lm decoder), nothing about shared inputs or scalings.
GENERIC = ArchSpec(model_types=())


def arch_for(model_type: str) -> ArchSpec:
    """The table of ``model_type``; a one-line error naming it when quantkit has none."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"model_type {model_type!r} has no architecture table in quantkit (known: {known}); "
            "add an ArchSpec in quantkit/arch/ or use a supported model")
    return spec


def model_type_of(model: Any) -> str | None:
    """The mlx-lm ``model_type`` of a loaded model (``None`` when it does not say)."""
    model_type = getattr(model, "model_type", None)
    if model_type is None:
        model_type = getattr(getattr(model, "args", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def arch_of(model: Any, strict: bool = False) -> ArchSpec:
    """The table of ``model``'s family. ``strict``: a one-line error when quantkit has none
    (what a method needing scale groups wants); otherwise :data:`GENERIC`."""
    model_type = model_type_of(model)
    if strict:
        return arch_for(model_type or f"<{type(model).__name__} without model_type>")
    return ARCHITECTURES.get(model_type or "", GENERIC)


def _attribute(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: Any, spec: ArchSpec | None = None) -> list:
    """The decoder blocks of ``model``, in order, found at its table's ``blocks`` path."""
    spec = spec or arch_of(model)
    blocks = _attribute(model, spec.blocks)
    if not blocks:
        blocks = getattr(model, "layers", None)  # mlx-lm's own property on every decoder
    if not blocks:
        raise ModelLoadError(
            f"model class {type(model).__name__} (model_type {model_type_of(model)!r}) exposes no "
            f"decoder blocks at `{spec.blocks}`; quantkit walks mlx-lm decoder models")
    return list(blocks)


def shared_input_groups(model: Any, paths: Iterable[str],
                        spec: ArchSpec | None = None) -> dict[str, str]:
    """``{path: leader}`` for each of ``paths`` (model paths, e.g.
    ``model.layers.3.mlp.switch_mlp.up_proj``) that reads the very same input as an earlier
    member of its table group, ``leader``, also among ``paths``. Paths not in a group, and
    group leaders, are absent."""
    spec = spec or arch_of(model)
    wanted = list(paths)
    present = set(wanted)
    out: dict[str, str] = {}
    for path in wanted:
        for group in spec.shared_inputs:
            for member in group:
                if not path.endswith("." + member):
                    continue
                prefix = path[: -len(member)]
                leader = next((prefix + m for m in group if prefix + m in present), None)
                if leader is not None and leader != path:
                    out[path] = leader
    return out


__all__ = [
    "ARCHITECTURES", "GENERIC", "TABLES", "ArchSpec", "ScaleGroup", "arch_for", "arch_of",
    "decoder_blocks", "model_type_of", "shared_input_groups",
]
