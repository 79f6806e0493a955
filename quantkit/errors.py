"""The few exception types users see. Each message is one line naming the problem and the fix."""


class QuantkitError(Exception):
    """Base class: every error quantkit raises on bad input derives from this."""


class SpecError(QuantkitError, ValueError):
    """A bits / group size / mode combination MLX cannot store."""


class RecipeError(QuantkitError, ValueError):
    """A recipe (TOML or code) that cannot be used; the message names the rule and the key."""


class ModelLoadError(QuantkitError):
    """A model directory that cannot be read."""


class CalibrationError(QuantkitError):
    """Calibration text that cannot give the requested samples."""


class OutputError(QuantkitError):
    """An output directory that cannot be written."""


class FactorizationError(QuantkitError, ArithmeticError):
    """A Hessian could not be factorized (not positive definite even after damping).

    The walker catches it, quantizes the layer with the fallback strategy and records why."""


class CheckpointError(QuantkitError):
    """A checkpoint that cannot be resumed (another run's, damaged) or cannot be written."""


class DistributedError(QuantkitError):
    """A distributed run that cannot go on: a rank died, the network failed, or the process
    group does not fit the run (more processes than calibration shards)."""


class PluginError(RecipeError):
    """A plugin (``--plugin``, a recipe's ``plugins``) that cannot be loaded: a missing file or
    module, an error while importing it, or a name it registers that is already taken."""
