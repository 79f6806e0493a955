"""Everything ``import quantkit`` offers, imported on first use (see ``quantkit/__init__.py``)."""

# ruff: noqa: F401 (re-exported by quantkit/__init__.py)

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
