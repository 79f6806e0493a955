"""What a quantized model directory holds: each layer's settings as ``mlx_lm.load`` applies them
(from ``config.json``'s ``quantization`` and the safetensors' ``.scales`` tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from .errors import ModelLoadError, describe
from .validate import read_config


@attrs.frozen
class QuantizedLayers:
    """``default``: the settings of layers the config does not name; ``layers``: one dict per
    layer (``path``, ``bits``, ``group_size``, ``mode``, ``quantized``), sorted by path."""

    default: dict[str, Any]
    layers: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "layers": self.layers}


def tensor_names(model_dir: str | Path) -> list[str]:
    """Names of the tensors in ``model_dir``'s safetensors files, read from their headers (no
    tensor data is loaded)."""
    names: list[str] = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{f} is not a readable safetensors file ({describe(exc)}); it may "
                                 "be truncated or corrupt") from None
        names += [k for k in header if k != "__metadata__"]
    return names


def quantized_layers(model_dir: str | Path) -> QuantizedLayers:
    """Each layer's quantization settings in ``model_dir`` as ``mlx_lm.load`` will apply them;
    a one-line :class:`ModelLoadError` for a directory that is not a quantized model."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)  # missing, not a file, unreadable, not a JSON object
    q = config.get("quantization")
    if not q or not isinstance(q, dict):
        raise ModelLoadError(f"{model_dir} is not quantized (config.json has no 'quantization')")
    names = tensor_names(model_dir)
    paths = sorted({k.rsplit(".", 1)[0] for k in names if k.endswith(".scales")} |
                   {k for k, v in q.items() if isinstance(v, (dict, bool))})
    default = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    rows: list[dict[str, Any]] = []
    for path in paths:
        setting = q.get(path, default)
        if setting is False:
            rows.append({"path": path, "bits": None, "group_size": None, "mode": None,
                         "quantized": False})
        else:
            rows.append({"path": path, "bits": setting.get("bits"),
                         "group_size": setting.get("group_size"),
                         "mode": setting.get("mode", "affine"), "quantized": True})
    return QuantizedLayers(default=default, layers=rows)
