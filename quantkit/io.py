"""Model directories in and out: load with clear errors, save what ``mlx_lm.load`` reads."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .errors import ModelLoadError, OutputError

#: Files copied from the source directory: tokenizer, chat template, generation settings.
COPY_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantization_report.json"}


def load_model(
    path: str | Path, *, allow_quantized: bool = False, lazy: bool = False
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, config)`` from a local mlx-lm model directory (never downloads).

    ``allow_quantized``: accept an already quantized directory (for evaluation);
    ``lazy``: do not read the weights until they are used (for planning)."""
    from mlx_lm.utils import load_model as _load_model
    from mlx_lm.utils import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist; pass a local mlx-lm model dir")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json; pass an mlx-lm model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); fix or re-download it") from None
    if "model_type" not in config:
        raise ModelLoadError(f"{config_path} has no 'model_type'; it is not an mlx-lm/HF model config")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights; convert the model first")
    if config.get("quantization") and not allow_quantized:
        raise ModelLoadError(f"{path} is already quantized; start from the full-precision model")
    try:
        model, config = _load_model(path, lazy=lazy)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "not supported" in msg or "model_type" in msg:
            raise ModelLoadError(f"model_type {config['model_type']!r} is not supported by the installed mlx-lm ({msg})") from None
        raise ModelLoadError(f"cannot load {path}: {msg}") from None
    except Exception as exc:  # corrupt safetensors, shape mismatches, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load weights from {path}: {msg}; the files may be truncated or corrupt") from None
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer, config


def save_model(
    out_dir: str | Path, model: nn.Module, config: dict[str, Any], source_dir: str | Path,
    extra_files: dict[str, str] | None = None, overwrite: bool = False,
) -> Path:
    """Write safetensors, config.json (with ``quantization`` and ``quantization_config``), the
    tokenizer files of ``source_dir`` and ``extra_files`` into ``out_dir``, atomically: into a
    temporary sibling first, renamed into place when complete."""
    from mlx_lm.utils import save_config
    from mlx_lm.utils import save_model as _save_model

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise OutputError(f"output directory {out_dir} already exists; pass --overwrite or another path")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {parent} ({exc.strerror}); choose a writable output path") from None
    try:
        _save_model(tmp, model, donate_model=False)
        save_config(dict(config), config_path=tmp / "config.json")
        for pattern in COPY_PATTERNS:
            for src in Path(source_dir).glob(pattern):
                if src.is_file() and src.name not in NOT_COPIED:
                    shutil.copy(src, tmp / src.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing {out_dir} failed ({exc.strerror or exc}); free disk space or choose another path") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
