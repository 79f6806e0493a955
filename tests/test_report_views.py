"""What ``quantkit report`` and ``quantkit eval`` render comes from the library: the report's
summary and row orders (:mod:`quantkit.report`), a directory's perplexity
(:func:`quantkit.compare.directory_perplexity`)."""

from __future__ import annotations

import math

import pytest

from quantkit.errors import ReportError
from quantkit.report import (
    LayerRecord,
    RunReport,
    ordered_layers,
    read_report,
    summarize,
    worst_by_output_kl,
)


def _run() -> RunReport:
    run = RunReport()
    run.add(LayerRecord("lm_head", "Linear", "quantized", strategy="gptq", relative_error=0.02))
    run.add(LayerRecord("model.layers.1.mlp.up_proj", "Linear", "quantized", strategy="gptq",
                        relative_error=0.05, output_kl=0.001))
    run.add(LayerRecord("model.layers.0.mlp.down_proj", "Linear", "skipped", reason="recipe: skip"))
    run.add(LayerRecord("model.layers.0.self_attn.q_proj", "Linear", "fallback", strategy="rtn",
                        reason="not positive definite", relative_error=0.01, output_kl=0.004))
    return run


def test_rows_ordered_by_depth_error_and_kl():
    run = _run()
    assert [r.path for r in ordered_layers(run, "depth")] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj", "lm_head"]
    assert [r.path for r in ordered_layers(run, "error")][:3] == [
        "model.layers.1.mlp.up_proj", "lm_head", "model.layers.0.self_attn.q_proj"]
    assert [r.path for r in ordered_layers(run, "kl")][:2] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    assert [r.path for r in worst_by_output_kl(run, 1)] == ["model.layers.0.self_attn.q_proj"]


def test_summary_names_the_worst_layers_fallbacks_and_skipped():
    s = summarize(_run(), top=2)
    assert s["layers"] == 4 and s["worst"] == ["model.layers.1.mlp.up_proj", "lm_head"]
    assert s["output_kl_total"] == pytest.approx(0.005)
    assert s["fallbacks"] == {"model.layers.0.self_attn.q_proj": "not positive definite"}
    assert s["skipped"] == {"model.layers.0.mlp.down_proj": "recipe: skip"}


def test_read_report_round_trips_and_refuses_what_is_not_a_report(tmp_path):
    run = _run()
    run.write(tmp_path)
    back = read_report(tmp_path / "quantization_report.json")  # the file or its directory
    assert [r.path for r in back.layers] == [r.path for r in run.layers]
    with pytest.raises(ReportError, match="has no quantization_report.json"):
        read_report(tmp_path / "elsewhere")
    (tmp_path / "quantization_report.json").write_text("{not json")
    with pytest.raises(ReportError, match="is not a quantkit run report"):
        read_report(tmp_path)


def test_directory_perplexity_is_the_perplexity_of_the_loaded_model(stories_dir, tinystories_text):
    from quantkit.calibration import read_text
    from quantkit.compare import directory_perplexity, eval_tokens
    from quantkit.evaluate import perplexity
    from quantkit.io import load_model

    row = directory_perplexity(stories_dir, tinystories_text, num_samples=2, seq_len=64, seed=3)
    model, tokenizer, _ = load_model(stories_dir, allow_quantized=True)
    tokens = eval_tokens(tokenizer, read_text(tinystories_text), 2, 64, 3)
    assert row.perplexity == perplexity(model, tokens, 8)
    assert (row.num_samples, row.seq_len, row.tokens, row.quantized) == (2, 64, 2 * 63, False)
    assert row.text == str(tinystories_text) and math.isfinite(row.bits_per_weight)
