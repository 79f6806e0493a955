"""KL divergence and top-1 agreement against a float model: the kernels against float64 NumPy,
``quantkit eval --reference`` against an independent computation from mlx-lm's outputs."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

from quantkit import Recipe, quantize_directory
from quantkit.calibration import make_batches, read_text, tokenize
from quantkit.cli import app
from quantkit.evaluate import fidelity, logit_stats, logsumexp_chunked, percentile

runner = CliRunner()


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference_stats(p_logits, q_logits, targets):
    """Float64 NumPy: full softmax, KL(p ‖ q), argmax agreement, target NLLs."""
    lp, lq = _log_softmax64(p_logits), _log_softmax64(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    agree = (np.argmax(p_logits, -1) == np.argmax(q_logits, -1)).astype(np.float64)
    t = np.asarray(targets)[..., None]
    return kl, agree, -np.take_along_axis(lp, t, -1)[..., 0], -np.take_along_axis(lq, t, -1)[..., 0]


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_logit_stats_match_float64(chunk):
    rng = np.random.default_rng(0)
    p = rng.normal(size=(3, 5, 97)) * 4
    q = p + rng.normal(size=p.shape) * 0.7
    q[0, 0] = p[0, 0]  # identical rows: KL exactly 0, agreement 1
    targets = rng.integers(0, 97, size=(3, 5))
    got = logit_stats(mx.array(p, dtype=mx.float32), mx.array(q, dtype=mx.float32),
                      mx.array(targets), chunk=chunk)
    kl, agree, ref_nll, nll = _reference_stats(p.astype(np.float32), q.astype(np.float32), targets)
    np.testing.assert_allclose(np.asarray(got["kl"]), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["agree"]), agree)
    np.testing.assert_allclose(np.asarray(got["ref_nll"]), ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["nll"]), nll, rtol=1e-5, atol=1e-5)
    assert float(got["kl"][0, 0]) == 0.0 and float(got["agree"][0, 0]) == 1.0


def test_chunked_logsumexp_and_argmax_with_large_values():
    x = np.array([[1000.0, 999.0, -5.0, 1000.0, 3.0], [-2.0, -1.0, -3.0, -1.5, -4.0]])
    lse, arg = logsumexp_chunked(mx.array(x, dtype=mx.float32), chunk=2)
    m = x.max(-1)
    np.testing.assert_allclose(np.asarray(lse), m + np.log(np.exp(x - m[:, None]).sum(-1)), rtol=1e-6)
    assert np.asarray(arg).tolist() == [0, 1]  # the first of tied maxima, as argmax


def test_percentile_matches_numpy():
    v = np.random.default_rng(1).exponential(size=1001)
    for q in (0, 50, 99, 100):
        assert percentile(v, q) == pytest.approx(np.percentile(v, q), rel=1e-12)


@pytest.fixture(scope="module")
def quantized_stories(stories_dir, tmp_path_factory):
    """stories260K quantized at 3 and 4 bits (RTN, group 32)."""
    out = {}
    for bits in (3, 4):
        d = tmp_path_factory.mktemp(f"q{bits}") / "model"
        quantize_directory(stories_dir, d, Recipe.uniform("rtn", bits, 32), num_samples=2,
                           seq_len=64)
        out[bits] = d
    return out


def _eval_json(model, reference, text, *extra):
    result = runner.invoke(app, ["eval", str(model), "--reference", str(reference), "--text",
                                 str(text), "--num-samples", "6", "--seq-len", "96", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("bits", [3, 4])
def test_eval_reference_matches_independent_computation(bits, quantized_stories, stories_dir,
                                                        tinystories_text):
    from mlx_lm import load

    got = _eval_json(quantized_stories[bits], stories_dir, tinystories_text, "--batch-size", "4")
    # independent: mlx-lm's own loader and full forward pass, float64 softmax in NumPy
    ref_model, tok = load(str(stories_dir))
    q_model, _ = load(str(quantized_stories[bits]))
    tokens = make_batches(tokenize(tok, read_text(tinystories_text), 6 * 96), 6, 96, 0)
    p = np.asarray(ref_model(tokens[:, :-1]).astype(mx.float32))
    q = np.asarray(q_model(tokens[:, :-1]).astype(mx.float32))
    kl, agree, ref_nll, nll = _reference_stats(p, q, np.asarray(tokens[:, 1:]))
    assert got["positions"] == kl.size == 6 * 95
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree.mean(), rel=1e-4)
    assert got["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    assert got["reference_perplexity"] == pytest.approx(np.exp(ref_nll.mean()), rel=1e-4)
    assert got["kl_mean"] > 0.01 and got["top1_agreement"] < 1.0
    assert got["bits_per_weight"] < 16 and got["size_bytes"] > 0
    assert f"{bits}b g32" in got["recipe"]


def test_fewer_bits_diverge_more(quantized_stories, stories_dir, tinystories_text):
    three = _eval_json(quantized_stories[3], stories_dir, tinystories_text)
    four = _eval_json(quantized_stories[4], stories_dir, tinystories_text)
    assert three["kl_mean"] > four["kl_mean"] and three["top1_agreement"] < four["top1_agreement"]


def test_model_against_itself(stories_dir, tinystories_text):
    got = _eval_json(stories_dir, stories_dir, tinystories_text)
    assert got["kl_mean"] == 0.0 and got["kl_p99"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["perplexity"] == got["reference_perplexity"]
    table = runner.invoke(app, ["eval", str(stories_dir), "--reference", str(stories_dir), "--text",
                                str(tinystories_text), "--num-samples", "2", "--seq-len", "64"])
    assert table.exit_code == 0 and "top-1 agreement" in table.stdout


@pytest.mark.parametrize("name", ["stories260K", "stories260K-moe4"])
def test_position_slices_give_the_same_result(name, tinystories_text):
    """Slices of 16 positions (KV cache between them) agree with one pass, dense and MoE."""
    from conftest import shared_path

    from quantkit.io import load_model

    path = shared_path("models", name)
    ref, tok, _ = load_model(path)
    model, _, _ = load_model(path)
    nn.quantize(model, group_size=32, bits=3,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    tokens = make_batches(tokenize(tok, read_text(tinystories_text), 4 * 80), 4, 80, 0)
    sliced = fidelity(model, ref, tokens, 2, max_logits=1, vocab_chunk=100)
    whole = fidelity(model, ref, tokens, 4)
    p = np.asarray(ref(tokens[:, :-1]).astype(mx.float32))
    q = np.asarray(model(tokens[:, :-1]).astype(mx.float32))
    kl, agree, _, _ = _reference_stats(p, q, np.asarray(tokens[:, 1:]))
    for f in (sliced, whole):
        assert f.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
        assert f.top1_agreement == pytest.approx(agree.mean(), abs=1.5 / kl.size)
        assert f.kl_mean > 0


def test_other_tokenizer_is_refused(stories_dir, tinystories_text, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(stories_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids
    (other / "tokenizer.json").write_text(json.dumps(tj))
    result = runner.invoke(app, ["eval", str(other), "--reference", str(stories_dir), "--text",
                                 str(tinystories_text), "--num-samples", "2", "--seq-len", "64"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another tokenizer" in lines[0] and "Traceback" not in result.output


def _png_text(path) -> dict[str, str]:
    """The tEXt chunks of a PNG file (after checking its signature)."""
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            chunks[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert kind == b"IEND"
    return chunks


def test_compare_three_variants(quantized_stories, stories_dir, tinystories_text, tmp_path):
    pytest.importorskip("matplotlib")
    gptq = tmp_path / "gptq4"
    quantize_directory(stories_dir, gptq, Recipe.uniform("gptq", 4, 32), num_samples=4, seq_len=64,
                       calibration=tinystories_text)
    dirs = [str(quantized_stories[3]), str(quantized_stories[4]), str(gptq)]
    common = ["compare", *dirs, "--reference", str(stories_dir), "--text", str(tinystories_text),
              "--num-samples", "4", "--seq-len", "96"]
    png = tmp_path / "kl.png"
    shown = runner.invoke(app, [*common, "--png", str(png)])
    assert shown.exit_code == 0, shown.output
    table = " ".join(shown.stdout.split())
    for d in dirs:
        assert d in table
    assert "KL mean" in table and "top-1" in table and "gptq ×" in table and "rtn ×" in table

    got = runner.invoke(app, [*common, "--json"])
    assert got.exit_code == 0, got.output
    rows = {r["model"]: r for r in json.loads(got.stdout)["models"]}
    assert set(rows) == set(dirs)
    assert rows[dirs[0]]["kl_mean"] > rows[dirs[1]]["kl_mean"] > 0  # 3 bits diverge more than 4
    drawn = json.loads(_png_text(png)["Description"])
    assert {p["model"] for p in drawn} == set(dirs)
    for p in drawn:
        assert p["kl_mean"] == pytest.approx(rows[p["model"]]["kl_mean"], rel=1e-6)
        assert p["bits_per_weight"] == pytest.approx(rows[p["model"]]["bits_per_weight"], rel=1e-6)


# -- KL sensitivity for --target-bpw, and the report's output KL ------------------------------


@pytest.fixture(scope="module")
def pad_dir():
    from conftest import shared_path

    return shared_path("models", "stories260K-pad192")


def test_kl_probe_is_the_kl_of_the_model_with_one_layer_replaced(pad_dir, tinystories_text):
    from quantkit.io import load_model
    from quantkit.mixed import KLProbe

    model, tok, _ = load_model(pad_dir)
    tokens = make_batches(tokenize(tok, read_text(tinystories_text), 4 * 64), 4, 64, 0)
    path = "model.layers.1.mlp.down_proj"
    w = model.model.layers[1].mlp.down_proj.weight
    probe = KLProbe(model, tokens, batch_size=3)
    assert probe(path, w) == 0.0
    packed = mx.quantize(w, group_size=64, bits=3)
    w3 = mx.dequantize(*packed, group_size=64, bits=3)
    got = probe(path, w3)
    # independently: a second copy of the model with that weight, a full forward, float64 KL
    other, _, _ = load_model(pad_dir)
    other.model.layers[1].mlp.down_proj.weight = w3
    p = np.asarray(model(tokens[:, :-1]).astype(mx.float32))
    q = np.asarray(other(tokens[:, :-1]).astype(mx.float32))
    kl, _, _, _ = _reference_stats(p, q, np.asarray(tokens[:, 1:]))
    assert got == pytest.approx(kl.mean(), rel=1e-4) and got > 0
    assert np.array_equal(np.asarray(model.model.layers[1].mlp.down_proj.weight), np.asarray(w))


def test_kl_fast_equals_kl_where_measured_and_scales_the_rest(pad_dir, stories_tokens):
    from quantkit.io import load_model
    from quantkit.mixed import measure_sensitivity
    from quantkit.specs import QuantSpec

    model, _, _ = load_model(pad_dir)
    calib, _ = stories_tokens
    cands = [QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(5, 64)]
    full = measure_sensitivity(model, calib[:4, :64], candidates=cands, sensitivity="kl",
                               reference_bpw=4.5, fisher_samples=2)
    fast = measure_sensitivity(model, calib[:4, :64], candidates=cands, sensitivity="kl-fast",
                               reference_bpw=4.5, fisher_samples=2)
    out = measure_sensitivity(model, calib[:4, :64], candidates=cands, sensitivity="output",
                              reference_bpw=4.5, fisher_samples=2)
    assert full.reference == fast.reference == QuantSpec(4, 64)
    kl = {lo.path: {s: e for _, e, s in lo.options} for lo in full.layers}
    est = {lo.path: {s: e for _, e, s in lo.options} for lo in fast.layers}
    err = {lo.path: {s: e for _, e, s in lo.options} for lo in out.layers}
    assert set(kl) == set(est) and len(kl) == 36
    for path in kl:
        ref = full.reference
        assert est[path][ref] == pytest.approx(kl[path][ref], rel=1e-6)
        for s in cands:
            assert est[path][s] == pytest.approx(err[path][s] / err[path][ref] * kl[path][ref], rel=1e-6)
            assert kl[path][s] > 0
        assert kl[path][QuantSpec(3, 64)] > kl[path][QuantSpec(5, 64)]


def test_target_bpw_records_each_layers_output_kl_in_the_report(pad_dir, tinystories_text, tmp_path):
    out = tmp_path / "mixed"
    result = runner.invoke(app, ["quantize", str(pad_dir), "-o", str(out), "--target-bpw", "4.3",
                                 "--calibration", str(tinystories_text), "--num-samples", "4",
                                 "--seq-len", "64", "-q"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "quantization_report.json").read_text())
    kls = {r["path"]: r["output_kl"] for r in saved["layers"]}
    assert len(kls) == 36 and all(v is not None and v > 0 for v in kls.values())
    assert saved["settings"]["output_kl"]["sensitivity"] == "kl-fast"

    shown = runner.invoke(app, ["report", str(out), "--json", "--top", "3"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)["summary"]
    ranked = sorted(kls, key=kls.get, reverse=True)[:3]
    assert summary["worst_by_output_kl"] == ranked
    assert summary["output_kl_total"] == pytest.approx(sum(kls.values()))
    table = runner.invoke(app, ["report", str(out), "--sort", "kl", "--top", "3"])
    assert table.exit_code == 0 and "out KL" in table.stdout
    text = " ".join(table.stdout.split())
    assert f"contribution to the output KL (nats per token, that layer alone quantized): {ranked[0]}" in text
    first_row = next(line for line in table.stdout.splitlines() if line.strip().startswith("model."))
    assert first_row.split()[0] == ranked[0]
