"""The pipeline ``quantkit quantize`` runs when the command names no recipe and no strategy:
defined here, and only here (the CLI and ``benchmarks/quality.py`` build it with
:func:`default_recipe`).

:data:`PIPELINES` holds the measured candidates (recipe tables, as in a TOML file, without
``bits``/``group_size``: those come from the command line or :class:`~quantkit.recipe.Recipe`'s
defaults); :data:`DEFAULT` names the one a plain ``quantkit quantize`` uses and :data:`FAST` the
one ``--fast`` uses. The choice and its measurements: docs/results-quality.md.
"""

from __future__ import annotations

from typing import Any

from .recipe import Recipe

#: GPTQ's act-order (static groups) and per-group clipping search weighted by ``diag(H)``.
_GPTQ_BEST: dict[str, Any] = {"strategy": "gptq", "act_order": True, "scale_search": "hessian"}

#: Candidate pipelines by name (the names ``benchmarks/quality.py`` gives its variants).
PIPELINES: dict[str, dict[str, Any]] = {
    "gptq": {"default": {"strategy": "gptq"}},
    "gptq_best": {"default": _GPTQ_BEST},
    "gptq_best_lr_scales": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "scales"}],
    },
}

#: What ``quantkit quantize MODEL -o OUT`` runs.
DEFAULT = "gptq"
#: What ``quantkit quantize MODEL -o OUT --fast`` runs.
FAST = "gptq"


def default_recipe(fast: bool = False) -> Recipe:
    """The recipe of a plain ``quantkit quantize`` (``fast``: of ``--fast``), at
    :class:`~quantkit.recipe.Recipe`'s default bits and group size (change them with
    :meth:`~quantkit.recipe.Recipe.with_default`)."""
    return Recipe.from_dict(PIPELINES[FAST if fast else DEFAULT], source="default recipe")
