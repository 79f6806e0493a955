"""quantkit.inspection (what `quantkit inspect` renders): settings per layer from config.json
and the safetensors headers, and one-line errors for directories that are not quantized models."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from quantkit.errors import ModelLoadError
from quantkit.inspection import quantized_layers, tensor_names


def _model_dir(tmp_path, quantization):
    q = mx.quantize(mx.random.normal((8, 64)), group_size=32, bits=4)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {
        "a.weight": q[0], "a.scales": q[1], "a.biases": q[2], "b.weight": mx.zeros((8, 64))})
    (tmp_path / "config.json").write_text(json.dumps({"quantization": quantization}))
    return tmp_path


def test_layers_take_the_default_or_their_own_settings(tmp_path):
    d = _model_dir(tmp_path, {"group_size": 32, "bits": 4, "b": False,
                              "c": {"group_size": 64, "bits": 8}})
    assert sorted(tensor_names(d)) == ["a.biases", "a.scales", "a.weight", "b.weight"]
    found = quantized_layers(d)
    assert found.default == {"group_size": 32, "bits": 4}
    assert found.layers == [
        {"path": "a", "bits": 4, "group_size": 32, "mode": "affine", "quantized": True},
        {"path": "b", "bits": None, "group_size": None, "mode": None, "quantized": False},
        {"path": "c", "bits": 8, "group_size": 64, "mode": "affine", "quantized": True},
    ]


@pytest.mark.parametrize("config, expected", [
    (None, "has no config.json"),
    ("{", "is not valid JSON"),
    ("{}", "is not quantized"),
])
def test_bad_directories_are_one_line(tmp_path, config, expected):
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=expected) as e:
        quantized_layers(tmp_path)
    assert "\n" not in str(e.value)


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    d = _model_dir(tmp_path, {"group_size": 32, "bits": 4})
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        quantized_layers(d)
