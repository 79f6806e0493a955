"""The validation pass: checks that turn bad input into one clear error before (or instead of)
silent damage. Pure checks on paths, settings, recipes and arrays; each raises a
:class:`~quantkit.errors.QuantkitError` subclass whose message names the problem and the fix.

- paths: :func:`check_input_file` (a regular, readable file, not a directory, device or pipe),
  :func:`check_output_file`, :func:`check_model_dir` (config.json readable, fits the model
  type; weight files readable), :func:`not_quantkit_output` (what ``--overwrite`` may replace);
- settings: :func:`check_settings` (seed, target bits per weight), :func:`launcher_environment`;
- recipes: :func:`rule_warnings` / :func:`check_rules` (rules that match no layer, or only
  layers an earlier rule took);
- arrays: :func:`check_packed` (a layer's stored arrays are finite before they are written).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, OutputError, QuantkitError, RecipeError, SettingsError

#: What makes a directory quantkit's own output (the only kind ``--overwrite`` replaces).
REPORT_NAME = "quantization_report.json"


# -- paths ------------------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def check_input_file(path: str | Path, what: str, error: type[QuantkitError] = QuantkitError,
                     fix: str = "pass a text file") -> Path:
    """``path`` as a regular file that can be opened for reading; else ``error`` saying which
    of these it is: missing, a directory, a device or pipe (``/dev/null``, ``<(...)``), or
    unreadable (permission)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({_why(exc)}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind(st.st_mode)}, not a file; {fix}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({_why(exc)}); fix its permissions or {fix}") from None
    return path


def check_output_file(path: str | Path, what: str, fix: str = "pass a file name") -> Path:
    """``path`` can be written as a file: not a directory, its parent not a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; {fix} (e.g. {path / 'report.png'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {what} {path}: {parent} is a file, not a directory")
            break
    return path


def check_model_dir(path: str | Path, allow_quantized: bool = False) -> dict[str, Any]:
    """The parsed config.json of model directory ``path``, after checking what mlx-lm would
    otherwise report confusingly: config.json missing / not a file / unreadable / not JSON /
    without ``model_type`` / missing keys its model class requires; no weights, or weight files
    that cannot be read (permission: not "corrupt")."""
    path = Path(path)
    config = read_config(path)
    config_path = path / "config.json"
    if "model_type" not in config:
        raise ModelLoadError(f"{config_path} has no 'model_type'; it is not an mlx-lm/HF model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{path} has no *.safetensors weights; convert the model first")
    for f in weights:
        check_input_file(f, "weight file", ModelLoadError, "re-download or convert the model")
    if config.get("quantization") and not allow_quantized:
        raise ModelLoadError(f"{path} is already quantized; start from the full-precision model")
    _check_model_args(config, config_path)
    return config


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of model directory ``path``: a clear :class:`ModelLoadError`
    when the directory or the file is missing, the file is not a regular file, is unreadable, is
    not JSON or not a JSON object."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise ModelLoadError(f"model path {path} is a file, not a directory; pass a local mlx-lm model directory")
        raise ModelLoadError(f"model directory {path} does not exist; pass a local mlx-lm model dir")
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{path} has no config.json; pass an mlx-lm model directory")
    check_input_file(config_path, "model config", ModelLoadError, "fix or re-download the model")
    try:
        config = json.loads(config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); fix or re-download it") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {config_path} ({_why(exc)}); fix its permissions") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} holds a JSON {type(config).__name__}, not an object; fix or re-download it")
    return config


def _check_model_args(config: dict[str, Any], config_path: Path) -> None:
    """A config.json lacking a key its mlx-lm model class requires is the config's fault (mlx-lm
    reports it as a TypeError while building the model, which reads like damaged weights)."""
    import inspect

    try:
        from .mlxlm import model_classes
        _, args_class = model_classes(config)
    except Exception:  # unknown model_type and the like: the loader reports those
        return
    try:
        params = inspect.signature(args_class).parameters
    except (TypeError, ValueError):
        return
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in config]
    if missing:
        raise ModelLoadError(
            f"{config_path} lacks {', '.join(repr(k) for k in missing)}, required by mlx-lm's "
            f"{config['model_type']!r} models; the config is incomplete: fix or re-download it")


def not_quantkit_output(path: str | Path) -> str | None:
    """``None`` when directory ``path`` was written by quantkit (it holds a
    ``quantization_report.json`` and a config.json with a ``quantization`` entry and weights) or
    is empty: the only directories ``--overwrite`` replaces. Else why not, for the message."""
    path = Path(path)
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        return f"it cannot be listed ({_why(exc)})"
    if not entries:
        return None
    if not (path / REPORT_NAME).is_file():
        return f"it has no {REPORT_NAME}"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "it has no readable config.json"
    if not isinstance(config, dict) or not config.get("quantization"):
        return "its config.json has no 'quantization' entry"
    if not list(path.glob("*.safetensors")):
        return "it holds no *.safetensors weights"
    return None


def missing_parents(path: str | Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    out = []
    for parent in Path(path).absolute().parents:
        if parent.exists() or parent.is_symlink():
            break
        out.append(parent)
    return out


@contextlib.contextmanager
def removing_created_parents(path: str | Path) -> Iterator[None]:
    """On failure, remove the (still empty) parent directories of ``path`` that did not exist
    when the block was entered: a failed run leaves nothing behind, not even ``a/b/`` of
    ``-o a/b/out``. A parent holding anything (a kept checkpoint) stays."""
    created = missing_parents(path)
    try:
        yield
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise


# -- settings --------------------------------------------------------------------------------------

def check_settings(*, seed: int | None = None, target_bpw: float | None = None,
                   timeout_s: float | None = None) -> None:
    """Settings that the calibration sampler or the planner would otherwise misuse: a negative
    seed (NumPy refuses it deep inside), a target that is not a positive finite number (NaN
    compares false with everything, so the planner would silently pick the cheapest specs), a
    timeout that is not a positive number of seconds."""
    if seed is not None and seed < 0:
        raise SettingsError(f"--seed {seed} is negative; pass a seed ≥ 0")
    if target_bpw is not None and not (math.isfinite(target_bpw) and target_bpw > 0):
        raise SettingsError(f"--target-bpw {target_bpw} is not a positive number of bits per "
                            "weight; pass e.g. --target-bpw 3.5")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise SettingsError(f"--timeout {timeout_s} is not a positive number of seconds; pass "
                            "e.g. --timeout 1800")


#: Environment variables by which a process launcher tells a rank where it is in a group.
LAUNCHER_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
                      "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launcher_environment(env: Mapping[str, str] | None = None) -> str | None:
    """The variable showing that this process is one rank of a launched group (``mlx.launch``,
    ``mpirun``), or ``None``. World-size variables count only when above 1."""
    env = os.environ if env is None else env
    for name in LAUNCHER_VARIABLES:
        value = env.get(name)
        if value is None:
            continue
        if name.endswith("_SIZE") and value.strip() in ("", "0", "1"):
            continue
        return name
    return None


# -- recipes ---------------------------------------------------------------------------------------

def rule_warnings(recipe, winners: Mapping[str, int | None]) -> list[tuple[int, str]]:
    """``(rule index, warning)`` for each rule of ``recipe`` that takes no layer: it matches
    none of ``winners`` (every quantizable layer's path → index of the rule that took it, or
    ``None`` for the default), or only layers an earlier rule took (first match wins)."""
    out = []
    for i, rule in enumerate(recipe.rules):
        matched = [p for p in winners if rule.matches(p)]
        label = f"rule {i + 1} ({rule.match!r})"
        if not matched:
            out.append((i, f"{label} matches no layer"))
        elif not any(winners[p] == i for p in matched):
            firsts = sorted({j for p in matched if (j := winners[p]) is not None})
            by = ", ".join(f"rule {j + 1}" for j in firsts) or "the model's own settings"
            out.append((i, f"{label} matches {len(matched)} layer(s), all taken by earlier "
                           f"rules ({by}; the first match wins)"))
    return out


def check_rules(recipe, winners: Mapping[str, int | None]) -> None:
    """Refuse a recipe with a rule that takes no layer (a typo in a path would silently lose
    the precision the user asked for): :class:`RecipeError` naming the first such rule."""
    warnings = rule_warnings(recipe, winners)
    if warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise RecipeError(f"recipe {warnings[0][1]}{more}; fix or remove the rule "
                          "(`quantkit recipe check RECIPE --model MODEL` lists what each rule matches)")


def plan_winners(plans: Mapping[str, Any], skipped: Iterable[Any]) -> dict[str, int | None]:
    """``{path: rule index}`` from a walker's plans (``rule_index``) and its report's skipped
    records (``rule``)."""
    winners = {path: p.rule_index for path, p in plans.items()}
    for r in skipped:
        winners.setdefault(r.path, r.rule)
    return winners


# -- arrays ------------------------------------------------------------------------------------------

def check_packed(path: str, arrays: Mapping[str, Any], dtype: str | None) -> None:
    """Refuse a layer whose stored arrays (weights, scales, biases) hold Inf or NaN: such a model
    loads but computes garbage. With ``--dtype float16`` this means values beyond float16's
    range (±65504)."""
    import mlx.core as mx

    floating = {k: v for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating)}
    finite = {k: mx.all(mx.isfinite(v)) for k, v in floating.items()}
    mx.eval(list(finite.values()))  # one wait for the device, not one per array
    for name, value in floating.items():
        if finite[name].item():
            continue
        bad = mx.sum(~mx.isfinite(value)).item()
        hint = ("its values exceed float16's range (±65504): pass --dtype bfloat16 (or float32)"
                if dtype == "float16" else
                "the calibration diverged: pass --dtype float32 or check the model's weights")
        raise SettingsError(f"layer {path}: {bad} of its quantized {name} are Inf/NaN; {hint}")
