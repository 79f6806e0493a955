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


class SettingsError(QuantkitError, ValueError):
    """A run setting that cannot be used (a negative seed, a non-finite target, a calibration
    dtype too narrow for the model's values); the message names the option and a valid choice."""


def describe(exc: BaseException, limit: int = 400) -> str:
    """``exc`` as one line for a message: all of its text (not its first line: mlx-lm's "Received
    1 parameters not in model: \\nNAME" names what matters on the second), whitespace collapsed,
    cut at ``limit`` characters. attrs validators raise ``TypeError(message, Attribute(...), ...)``:
    only the message is kept, not the repr of the other arguments."""
    args: tuple = getattr(exc, "args", ())
    text = args[0] if len(args) > 1 and isinstance(args[0], str) else str(exc)
    if isinstance(exc, OSError) and exc.strerror and not text:
        text = exc.strerror
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


class ReportError(QuantkitError):
    """A run report (``quantization_report.json``) that is missing or cannot be read."""


class EvaluationError(QuantkitError, ArithmeticError):
    """A model whose loss on the text is not a number, or so large that its perplexity
    overflows: its outputs are broken (damaged weights, a failed quantization)."""
