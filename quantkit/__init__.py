"""quantkit: post-training weight quantization for MLX language models.

Subclass :class:`Quantizer`, :class:`HessianCollector`, :class:`Packer` or
:class:`InverseStrategy` to try a new method; mix strategies per layer with a :class:`Recipe`;
run everything with :func:`quantize_model` / :func:`quantize_directory` or the ``quantkit`` CLI.
"""

from .api import DirectoryResult, quantize_directory, quantize_model
from .calibration import builtin_text, calibration_tokens
from .checkpoint import Checkpoint, DirectoryCheckpoint
from .distributed import Distributed
from .errors import (
    CalibrationError,
    CheckpointError,
    DistributedError,
    FactorizationError,
    ModelLoadError,
    OutputError,
    PluginError,
    QuantkitError,
    RecipeError,
    SpecError,
)
from .evaluate import perplexity
from .gptaq import GPTAQQuantizer
from .hessian import DenseHessianCollector, HessianCollector, HessianStats
from .inverse import DampedCholesky, EscalatingCholesky, InverseFactor, InverseStrategy
from .io import load_model, save_model
from .mixed import MixedPlan, plan_mixed_precision
from .packers import AffinePacker, FloatFormatPacker, Packer, packer_for
from .quantizers import (
    STRATEGIES,
    GPTQQuantizer,
    Quantizer,
    QuantResult,
    RTNQuantizer,
    register_strategy,
    round_to_nearest,
)
from .recipe import Recipe, Rule
from .registry import DEFAULT_REGISTRY, LayerHandler, LayerRegistry
from .report import LayerRecord, RunReport
from .specs import QuantSpec
from .walker import ModelWalker, WalkResult

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
