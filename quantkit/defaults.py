"""The pipeline ``quantkit quantize`` runs when the command names no recipe and no strategy:
defined here, and only here (the CLI and ``benchmarks/quality.py`` build it with
:func:`default_recipe`).

:data:`PIPELINES` holds the measured candidates (recipe tables, as in a TOML file, without
``bits``/``group_size``: those come from the command line or :class:`~quantkit.recipe.Recipe`'s
defaults); :data:`DEFAULT` names the one a plain ``quantkit quantize`` uses. ``--fast`` runs
the same recipe without its block transforms and optimizers (:func:`without_block_methods`).
The choice and its measurements: docs/results-quality.md.
"""

from __future__ import annotations

from typing import Any

import attrs

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
    "gptq_best_lr": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround"}],
    },
    "gptq_best_lr_fm_head": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "target": "float_model",
                       "head": True}],
    },
    # Candidates for issue 18's SmolLM2-135M 4-bit target (docs/results-quality.md): more
    # learned-rounding steps (8 or 12 passes over the calibration set instead of 4), and the
    # float model's activations as targets without the head stage.
    "gptq_best_lr_e8": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "epochs": 8.0}],
    },
    "gptq_best_lr_e12": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "epochs": 12.0}],
    },
    "gptq_best_lr_fm": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "target": "float_model"}],
    },
    "gptq_best_lr_fm_e8": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "target": "float_model",
                       "epochs": 8.0}],
    },
    # The tied embedding / output head solved with GPTQ damping 0.1 instead of 0.01 (the
    # recipe's [embedding] table; it acts as a regulariser of a Hessian measured on the
    # calibration text): ahead of gptq_best_lr in five of six cells measured, level in the
    # sixth (docs/results-quality.md).
    "gptq_best_lr_td": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround"}],
        "embedding": {"tied_damping": 0.1},
    },
    # Half the learned rounding's step (lr_scale 0.5: the first step 1/(2·steps)): on
    # SmolLM2-135M a lower KL in each of three orders of the calibration sequences and a lower
    # mean perplexity, at 3 bits lower both; on the 260K-parameter fixtures behind
    # (docs/results-quality.md). The default since session 28.
    "gptq_best_lr_td_lrh": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "lr_scale": 0.5}],
        "embedding": {"tied_damping": 0.1},
    },
    # The previous default followed by end-to-end distillation of every layer's scales and
    # biases (quantkit.pipeline.distill), streamed block by block after the walk: SmolLM2-135M
    # 4-bit past issue 18's 60% in three orders, lower perplexity and KL in all four fixture
    # cells (docs/results-quality.md). The default since session 31.
    "gptq_best_lr_td_lrh_kd": {
        "default": _GPTQ_BEST,
        "optimizer": [{"name": "learned_rounding", "method": "signround", "lr_scale": 0.5}],
        "embedding": {"tied_damping": 0.1},
        "distill": {},
    },
    # AWQ needs the model family's table (quantkit/arch/): a model without one is refused.
    "awq_gptq_best_lr": {
        "default": _GPTQ_BEST,
        "transform": [{"name": "awq"}],
        "optimizer": [{"name": "learned_rounding", "method": "signround"}],
    },
}

#: What ``quantkit quantize MODEL -o OUT`` runs.
DEFAULT = "gptq_best_lr_td_lrh_kd"


def default_recipe(fast: bool = False) -> Recipe:
    """The recipe of a plain ``quantkit quantize`` (``fast``: of ``--fast``), at
    :class:`~quantkit.recipe.Recipe`'s default bits and group size (change them with
    :meth:`~quantkit.recipe.Recipe.with_default`)."""
    recipe = Recipe.from_dict(PIPELINES[DEFAULT], source="default recipe")
    return without_block_methods(recipe) if fast else recipe


def without_block_methods(recipe: Recipe) -> Recipe:
    """``recipe`` without its block transforms, optimizers and distillation (what ``--fast``
    runs): only the per-layer solve, the costly methods (AWQ, learned rounding, end-to-end
    distillation) left out."""
    return attrs.evolve(recipe, transforms=(), optimizers=(), distill=None)
