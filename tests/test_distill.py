"""End-to-end distillation of scales and biases (``[distill]``, quantkit.pipeline.distill)."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path
from mlx.utils import tree_flatten
from test_block_methods import tiny_llama

from quantkit import Recipe
from quantkit.api import quantize_directory, quantize_model
from quantkit.defaults import without_block_methods
from quantkit.errors import RecipeError
from quantkit.pipeline.distill import token_kl


def _tokens() -> mx.array:
    return mx.array(np.random.default_rng(0).integers(0, 96, size=(8, 33)))


def _recipe(**distill) -> Recipe:
    raw = {"default": {"strategy": "rtn", "bits": 3, "group_size": 32}}
    return Recipe.from_dict({**raw, **({"distill": distill} if distill else {})})


def _kl(model: nn.Module, teacher: nn.Module, tokens: mx.array) -> float:
    """Mean per-token KL(teacher ‖ model) on the inputs ``tokens[:, :-1]``, 2 sequences a time."""
    x = tokens[:, :-1]
    total = sum(token_kl(model(x[i:i + 2]), nn.log_softmax(teacher(x[i:i + 2]), axis=-1)).item() * 2
                for i in range(0, x.shape[0], 2))
    return total / x.shape[0]


def _arrays(model: nn.Module, suffix: str) -> dict[str, bytes]:
    return {k: np.asarray(v).tobytes() for k, v in tree_flatten(model.parameters()) if k.endswith(suffix)}


def _figures(result) -> dict:
    (entry,) = [m for m in result.report.block_methods if m["kind"] == "distill"]
    return entry["figures"]


def test_token_kl_matches_float64():
    rng = np.random.default_rng(1)
    logits, teacher = rng.normal(size=(2, 5, 11)) * 3, rng.normal(size=(2, 5, 11)) * 3
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = (np.exp(logp) * (logp - logq)).sum(-1).mean()
    got = token_kl(mx.array(logits, dtype=mx.float32), mx.array(logp, dtype=mx.float32)).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_distillation_lowers_the_calibration_kl_keeps_the_codes_and_is_deterministic():
    tokens = _tokens()
    teacher = tiny_llama()
    plain = tiny_llama()
    quantize_model(plain, tokens, _recipe())
    runs = []
    for _ in range(2):
        model = tiny_llama()
        runs.append((model, quantize_model(model, tokens, _recipe(epochs=3, lr=1e-4))))
    (model, result), (again, _) = runs
    figures = _figures(result)
    assert figures["kept"] and figures["steps"] == 12
    assert figures["kl_after"] < 0.9 * figures["kl_before"]
    # The figures are the KL of the models as stored, measured independently.
    assert figures["kl_before"] == pytest.approx(_kl(plain, teacher, tokens), rel=1e-4)
    assert figures["kl_after"] == pytest.approx(_kl(model, teacher, tokens), rel=1e-4)
    # Only scales and biases move: the codes are those of the plain run.
    assert _arrays(model, ".weight") == _arrays(plain, ".weight")
    assert _arrays(model, ".scales") != _arrays(plain, ".scales")
    assert all(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    assert _arrays(model, "") == _arrays(again, "")  # the same bytes again


def test_distillation_never_keeps_a_worse_state():
    tokens = _tokens()
    plain, model = tiny_llama(), tiny_llama()
    quantize_model(plain, tokens, _recipe())
    figures = _figures(quantize_model(model, tokens, _recipe(epochs=1, lr=10.0)))
    assert not figures["kept"] and figures["kl_after"] > figures["kl_before"]
    assert _arrays(model, "") == _arrays(plain, "")


def test_distilled_directory_output_is_what_was_tuned_and_loads_in_mlx_lm(tmp_path):
    import mlx_lm

    from quantkit.data import Calibration, load_calibration

    model_dir = shared_path("models", "stories260K-pad192")
    text = shared_path("text", "tinystories_sample.txt")
    recipe = Recipe.from_dict({"default": {"strategy": "gptq", "bits": 3, "group_size": 32},
                               "distill": {"epochs": 2, "lr": 1e-4}})
    done = quantize_directory(model_dir, tmp_path / "q", recipe, calibration=str(text),
                              num_samples=8, seq_len=64)
    figures = _figures(done)
    assert figures["kept"] and figures["kl_after"] < figures["kl_before"]
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert report["block_methods"][-1]["figures"] == figures
    loaded, tokenizer = mlx_lm.load(str(tmp_path / "q"))
    teacher, _ = mlx_lm.load(str(model_dir))
    tokens = load_calibration(tokenizer, Calibration.from_specs(str(text)), 8, 64, 0).tokens
    assert _kl(loaded, teacher, tokens) == pytest.approx(figures["kl_after"], rel=1e-3)
    assert isinstance(mlx_lm.generate(loaded, tokenizer, prompt="Once upon", max_tokens=2), str)


@pytest.mark.parametrize("table, message", [
    ({"epoch": 2}, "unknown key 'epoch'"),
    ({"lr": -1}, "lr must be a number > 0"),
    ({"epochs": 1.5}, "epochs must be an integer ≥ 1"),
    (3, "'distill' must be a table"),
])
def test_distill_table_is_validated_with_one_line_errors(table, message):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.from_dict({"distill": table})
    assert "\n" not in str(err.value)


def test_distill_table_round_trips_and_fast_drops_it(tmp_path):
    recipe = Recipe.from_dict({"distill": {"epochs": 2, "lr": 3e-5}})
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert Recipe.from_toml(path) == recipe
    assert Recipe.from_toml(path).distill is not None
    assert without_block_methods(recipe).distill is None
    empty = Recipe.from_dict({"distill": {}})
    assert empty.distill is not None and Recipe.from_dict(copy.deepcopy(empty.to_dict())) == empty


def test_cli_distill_flag_adds_the_stage_and_records_it(tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli import app

    model_dir = shared_path("models", "stories260K-pad192")
    text = shared_path("text", "tinystories_sample.txt")
    args = ["quantize", str(model_dir), "--strategy", "rtn", "--bits", "3", "--group-size", "32",
            "--calibration", str(text), "--num-samples", "4", "--seq-len", "64", "--quiet"]
    result = CliRunner().invoke(app, [*args[:-1], "-o", str(tmp_path / "d"), "--distill"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "quantization_report.json").read_text())
    assert report["settings"]["recipe"]["distill"] == {}
    (entry,) = [m for m in report["block_methods"] if m["kind"] == "distill"]
    figures = entry["figures"]
    assert figures["steps"] == 2 and "distill" in report["phases"]
    # The summary says what the stage did, with the report's figures.
    assert f"calibration KL to the float model {figures['kl_before']:.4f} → {figures['kl_after']:.4f}" \
        in result.output
    plain = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "p")])
    assert plain.exit_code == 0, plain.output
    report = json.loads((tmp_path / "p" / "quantization_report.json").read_text())
    assert "distill" not in report["settings"]["recipe"] and not report["block_methods"]


def test_block_by_block_gradient_equals_the_whole_models_autograd():
    """A step's gradient, taken one block at a time with each block's forward pass recomputed,
    is the gradient MLX's autograd gives for the whole model at once (tied embedding: both
    uses summed)."""
    from mlx.utils import tree_unflatten

    from quantkit.pipeline.distill import _Stream, _Tuned, tunable_layers

    tokens = _tokens()
    model = tiny_llama()
    quantize_model(model, tokens, _recipe())
    x = tokens[:4, :-1]
    t = nn.log_softmax(tiny_llama()(x), axis=-1)
    tuned = {p: _Tuned(m) for p, m in tunable_layers(model)}
    model.update_modules(tree_unflatten(list(tuned.items())))
    params = {f"{p}.{k}": getattr(m, k) + 0.01 * mx.random.normal(getattr(m, k).shape, key=mx.random.key(3))
              for p, m in tuned.items() for k in ("scales", "biases")}
    paths = [f"model.layers.{i}" for i in range(2)]
    stream = _Stream(model, list(model.model.layers), paths, [None, None],
                     [[k for k in sorted(params) if k.startswith(b + ".")] for b in paths],
                     [k for k in sorted(params) if k.startswith("model.embed_tokens.")])
    grads: dict = {}
    parts: list[list[str]] = []

    def sink(g):
        assert not set(g) & set(grads)  # each parameter's gradient once, whole
        parts.append(sorted(g))
        grads.update(g)

    value = stream.loss(params, x, t, 0.5, sink)
    assert parts == [stream.keys[1], stream.keys[0], stream.outside]  # the last block first

    def whole(p):
        model.update(tree_unflatten(list(p.items())))
        return token_kl(model(x), t) * 0.5

    want_value, want = mx.value_and_grad(whole)(params)
    assert value.item() == pytest.approx(want_value.item(), rel=1e-5)
    assert sorted(grads) == sorted(want) and "model.embed_tokens.scales" in grads
    for k in want:
        scale = np.abs(np.asarray(want[k])).max()
        assert scale > 0, k
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want[k]), atol=1e-4 * scale, err_msg=k)


def test_distillation_from_block_files_equals_the_one_in_memory(tmp_path):
    """With the walk's block files, each block's arrays go back to lazy loads of its file after
    every use; the tuned values are those of the same run held in memory."""
    from quantkit.checkpoint import BlockFiles

    tokens = _tokens()
    (tmp_path / "blocks").mkdir()
    held, streamed = tiny_llama(), tiny_llama()
    a = quantize_model(held, tokens, _recipe(epochs=2, lr=1e-4))
    b = quantize_model(streamed, tokens, _recipe(epochs=2, lr=1e-4),
                       checkpoint=BlockFiles(tmp_path / "blocks"))
    assert len(list((tmp_path / "blocks").iterdir())) == 2
    fa, fb = _figures(a), _figures(b)
    assert fa["kept"] and fb["kept"]
    assert fb["kl_after"] == pytest.approx(fa["kl_after"], rel=1e-5)
    for (k, va), (k2, vb) in zip(tree_flatten(held.parameters()), tree_flatten(streamed.parameters())):
        assert k == k2
        np.testing.assert_allclose(np.asarray(va.astype(mx.float32)), np.asarray(vb.astype(mx.float32)),
                                   rtol=1e-5, atol=1e-6, err_msg=k)
