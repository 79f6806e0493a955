"""quantkit: post-training weight quantization for MLX language models.

Subclass :class:`Quantizer`, :class:`HessianCollector`, :class:`Packer` or
:class:`InverseStrategy` to try a new method; mix strategies per layer with a :class:`Recipe`;
run everything with :func:`quantize_model` / :func:`quantize_directory` or the ``quantkit`` CLI.
"""

# ruff: noqa: F405 (the names in __all__ come from _exports, imported on first use)
from typing import TYPE_CHECKING

# The public names are imported on first use (PEP 562): ``import quantkit`` (and so the
# ``quantkit`` command's start-up, which must install its signal handlers before MLX, mlx-lm
# and transformers are imported; see quantkit.interrupt) costs nothing until a name is used.
if TYPE_CHECKING:
    from ._exports import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REGISTRY", "STRATEGIES", "AffinePacker", "CalibrationError", "Checkpoint",
    "CheckpointError", "DampedCholesky", "DirectoryCheckpoint",
    "DenseHessianCollector", "DirectoryResult", "Distributed", "DistributedError", "EscalatingCholesky", "FactorizationError",
    "FloatFormatPacker", "GPTAQQuantizer", "GPTQQuantizer", "MixedPlan", "plan_mixed_precision", "HessianCollector", "HessianStats", "InverseFactor",
    "InverseStrategy", "LayerHandler", "LayerRecord", "LayerRegistry", "ModelLoadError",
    "ModelWalker", "OutputError", "Packer", "PluginError", "QuantResult", "QuantSpec", "Quantizer",
    "QuantkitError", "RTNQuantizer", "Recipe", "RecipeError", "Rule", "RunReport", "SpecError",
    "WalkResult", "builtin_text", "calibration_tokens", "load_model", "packer_for", "perplexity",
    "quantize_directory", "quantize_model", "register_strategy", "round_to_nearest", "save_model",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
    from . import _exports

    values = {k: getattr(_exports, k) for k in __all__}
    globals().update(values)
    return values[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
