"""End to end on the real stories260K: quantize, reload with mlx_lm.load, perplexity, generate."""

from __future__ import annotations

import json

import pytest

from quantkit import Recipe, perplexity, quantize_directory, quantize_model
from quantkit.io import load_model


@pytest.fixture(scope="module")
def runs(stories_dir, tinystories_text, stories_tokens, tmp_path_factory):
    """Quantize stories260K with RTN and GPTQ at 4 and 3 bits (group 32) into directories."""
    out = {}
    root = tmp_path_factory.mktemp("runs")
    for strategy in ("rtn", "gptq"):
        for bits in (4, 3):
            out[strategy, bits] = quantize_directory(
                stories_dir, root / f"{strategy}{bits}", Recipe.uniform(strategy, bits, 32),
                calibration=tinystories_text, num_samples=32, seq_len=256, seed=0,
            )
    return out


def test_output_loads_in_mlx_lm_and_gptq_beats_rtn(runs, stories_dir, stories_tokens):
    from mlx_lm import load

    _, evaluation = stories_tokens
    model, _ = load(str(stories_dir))
    ppl = {"float": perplexity(model, evaluation)}
    for key, run in runs.items():
        model, _ = load(str(run.out_dir))
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"  # width 172
        assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
        ppl[key] = perplexity(model, evaluation)
    print("stories260K perplexity:", ppl)
    assert ppl["float"] < ppl["gptq", 4] < ppl["rtn", 3]
    assert ppl["gptq", 3] < ppl["rtn", 3]
    assert ppl["gptq", 4] <= ppl["rtn", 4]
    assert ppl["gptq", 4] < ppl["float"] * 1.1


def test_config_and_report(runs):
    run = runs["gptq", 3]
    config = json.loads((run.out_dir / "config.json").read_text())
    q = config["quantization"]
    assert {k: q[k] for k in ("bits", "group_size", "mode")} == {"bits": 3, "group_size": 32, "mode": "affine"}
    assert config["quantization_config"] == q
    skipped = sorted(k for k, v in q.items() if v is False)
    assert skipped == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    report = json.loads((run.out_dir / "quantization_report.json").read_text())
    reasons = {r["path"]: r["reason"] for r in report["layers"] if r["status"] == "skipped"}
    assert all("172" in reasons[k] for k in skipped)
    assert (run.out_dir / "tokenizer.json").is_file()
    assert report["bits_per_weight"] < 16


def test_generation_runs(runs):
    from mlx_lm import generate, load

    model, tokenizer = load(str(runs["gptq", 4].out_dir))
    text = generate(model, tokenizer, prompt="Once upon a time", max_tokens=20)
    assert len(text.strip()) > 0


def test_mixed_recipe_writes_per_layer_dicts(stories_dir, stories_tokens, tmp_path):
    recipe = Recipe.from_dict({
        "default": {"strategy": "gptq", "bits": 4, "group_size": 32},
        "rules": [
            {"match": "model.layers.0.*", "strategy": "rtn", "bits": 8, "group_size": 64},
            {"match": "*.v_proj", "bits": 6},
            {"match": "model.embed_tokens", "strategy": "skip"},
        ],
    })
    run = quantize_directory(stories_dir, tmp_path / "mixed", recipe, calibration=None,
                             num_samples=4, seq_len=128)
    q = run.quantization
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["model.layers.3.self_attn.v_proj"] == {"group_size": 32, "bits": 6, "mode": "affine"}
    assert q["model.embed_tokens"] is False
    assert "model.layers.3.self_attn.q_proj" not in q  # same as the default
    strategies = {r.path: r.strategy for r in run.report.layers}
    assert strategies["model.layers.0.mlp.up_proj"] == "rtn"
    assert strategies["model.layers.2.mlp.up_proj"] == "gptq"
    from mlx_lm import load

    model, _ = load(str(run.out_dir))
    assert model.model.layers[0].self_attn.q_proj.bits == 8
    assert model.model.layers[3].self_attn.v_proj.bits == 6
    assert type(model.model.embed_tokens).__name__ == "Embedding"


def test_calibration_is_sequential_block_by_block(stories_dir, stories_tokens):
    """Block i's layers are quantized (and their Hessians dropped) before block i+1 is
    calibrated; the output head comes last."""
    model, _, _ = load_model(stories_dir)
    calib, _ = stories_tokens
    events: list[str] = []

    def progress(event, info):
        if event == "block":
            events.append(f"block{info['index']}")
        elif event == "layer":
            events.append(f"layer{info['record'].block}")

    quantize_model(model, calib[:4], Recipe.uniform("gptq", 4, 32), progress=progress)
    got = events
    assert got[-1] == "layerNone"  # the tied embedding / output head
    order = [e for e in got if e.startswith("block")]
    assert order == [f"block{i}" for i in range(5)]
    for i in range(5):
        start, end = got.index(f"block{i}"), (got.index(f"block{i + 1}") if i < 4 else len(got) - 1)
        assert set(got[start + 1 : end]) == {f"layer{i}"}
