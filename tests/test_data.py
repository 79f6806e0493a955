"""Calibration sources (quantkit.data): JSONL text and chat rows, mixtures, document-aligned
samples, warnings, and the one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.data import (
    Calibration,
    Source,
    load_calibration,
    parse_source,
    quotas,
    read_documents,
)
from quantkit.errors import CalibrationError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

CHATS = [
    [{"role": "user", "content": "What is a cat?"},
     {"role": "assistant", "content": "A cat is a small furry animal that many people keep as a "
                                      "pet. Cats like to sleep in the sun and chase mice."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Tell me a story about a dog."},
     {"role": "assistant", "content": "Once upon a time a little dog named Max found a red ball "
                                      "in the park and played with it all day long."}],
    [{"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green and blue are three colours of the rainbow."}],
]


@pytest.fixture(scope="module")
def stories_tokenizer(stories_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(stories_dir)


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the shared GGUF (~3 s); the converter keeps the
    GGUF's chat template in tokenizer_config.json (checked below), nothing is added."""
    gguf = shared_path("models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, str(gguf.parent.parent / "tools" / "gguf_to_mlx.py"),
                    str(gguf), str(out)], check=True, capture_output=True)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- parsing ------------------------------------------------------------------------------------

def test_source_spec_rule(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    colon = tmp_path / "a:b.txt"  # a path containing ':' is taken whole
    colon.write_text("x")
    assert parse_source(str(plain)) == Source(str(plain), 1.0)
    assert parse_source(f"{plain}:0.25") == Source(str(plain), 0.25)
    assert parse_source(str(colon)) == Source(str(colon), 1.0)
    assert parse_source(f"{colon}:2") == Source(str(colon), 2.0)
    assert parse_source("builtin:3") == Source("builtin-austen", 3.0)  # the default's name
    assert parse_source("builtin-pydoc") == Source("builtin-pydoc", 1.0)
    for bad in ("abc", "-1", "nan", "inf", ""):
        with pytest.raises(CalibrationError, match="is not a positive number"):
            parse_source(f"{plain}:{bad}")
    with pytest.raises(CalibrationError, match="does not exist"):
        parse_source(str(tmp_path / "missing.txt:0.5"))


def test_quotas_within_one_sample():
    for weights, n in [((0.5, 0.5), 7), ((1, 1, 1), 10), ((0.3, 0.7), 9), ((5, 0, 1), 13),
                       ((1e-3, 1), 4)]:
        parts = quotas(weights, n)
        assert sum(parts) == n
        total = sum(weights)
        assert all(abs(p - n * w / total) < 1 for p, w in zip(parts, weights))


# -- documents and samples ----------------------------------------------------------------------

def test_samples_start_at_documents_unless_packed(stories_tokenizer, tmp_path):
    words = "the cat sat on a mat and looked at the big red sun over the hill".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(3, 60, size=40)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    docs = read_documents(Source(str(path)), stories_tokenizer)
    assert [d.tolist() for d in docs] == [stories_tokenizer.encode(t) for t in texts]
    seq_len = 24
    data = load_calibration(stories_tokenizer, [str(path)], 1000, seq_len)
    eos = stories_tokenizer.eos_token_id
    starts = {tuple(d[:4].tolist()) for d in docs}
    # Samples of long documents: windows inside one document; of short ones: documents joined
    # by EOS, the first from its beginning. No padding anywhere.
    for row in np.asarray(data.tokens).tolist():
        inside = [d for d in docs if len(d) >= seq_len and any(
            d[k:k + seq_len].tolist() == row for k in range(0, len(d) - seq_len + 1, seq_len))]
        assert inside or tuple(row[:4]) in starts
        if not inside:
            pieces = [p for p in _split(row, eos)]
            for piece in pieces[:-1]:
                assert any(d.tolist() == piece for d in docs)
    stream = np.concatenate([p for d in docs for p in (d, [eos])][:-1])
    packed = load_calibration(stories_tokenizer, Calibration.from_specs([str(path)], pack=True),
                              1000, seq_len)
    assert packed.tokens.shape[0] == len(stream) // seq_len  # every window of the stream
    assert packed.tokens.shape[0] > data.tokens.shape[0]
    assert np.array_equal(np.asarray(packed.tokens).reshape(-1), stream[: packed.tokens.size])
    assert data.to_report()["pack"] is False and packed.to_report()["pack"] is True


def _split(row, sep):
    out, cur = [], []
    for t in row:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [*out, cur]


def test_plain_text_gives_the_same_windows_as_before(stories_tokenizer, tinystories_text):
    from quantkit.calibration import make_batches, read_text, tokenize

    old = make_batches(tokenize(stories_tokenizer, read_text(tinystories_text)), 16, 64, seed=3)
    new = load_calibration(stories_tokenizer, str(tinystories_text), 16, 64, seed=3).tokens
    assert np.array_equal(np.asarray(old), np.asarray(new))


def test_mixture_shares_and_report(stories_tokenizer, tinystories_text, tmp_path):
    shakespeare = shared_path("text", "tinyshakespeare.txt")
    specs = [f"{tinystories_text}:0.3", f"{shakespeare}:0.7"]
    data = load_calibration(stories_tokenizer, specs, 11, 64, seed=1)
    report = data.to_report()
    assert [s["samples"] for s in report["sources"]] == [3, 8]  # 3.3 and 7.7 samples
    assert [s["tokens"] for s in report["sources"]] == [3 * 64, 8 * 64]
    assert report["samples"] == 11 and report["tokens"] == 11 * 64
    rows = np.asarray(data.tokens)
    stories = load_calibration(stories_tokenizer, str(tinystories_text), 10_000, 64).tokens
    stories_rows = {tuple(r) for r in np.asarray(stories).tolist()}
    assert [tuple(r) in stories_rows for r in rows.tolist()] == [True] * 3 + [False] * 8
    again = load_calibration(stories_tokenizer, specs, 11, 64, seed=1)
    assert np.array_equal(rows, np.asarray(again.tokens))


def test_short_source_reduces_the_mixture_and_warns(stories_tokenizer, tinystories_text, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(" ".join(["Once upon a time there was a cat."] * 30))
    n_small = len(stories_tokenizer.encode(small.read_text())) // 32
    data = load_calibration(stories_tokenizer, [f"{small}:1", f"{tinystories_text}:1"], 200, 32)
    counts = [s["samples"] for s in data.sources]
    assert counts == [n_small, n_small]  # shares kept: the total went down
    assert len(data.warnings) == 1 and "--num-samples 200 reduced to" in data.warnings[0]


# -- chat -----------------------------------------------------------------------------------------

def test_chat_rows_are_rendered_with_the_chat_template(smollm_dir, tmp_path):
    from mlx_lm.utils import load_tokenizer

    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert "{% for message in messages %}" in config["chat_template"]  # kept by the converter
    tok = load_tokenizer(smollm_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    docs = read_documents(Source(str(path)), tok)
    for doc, messages in zip(docs, CHATS, strict=True):
        assert doc.tolist() == list(tok.apply_chat_template(messages, tokenize=True))
        assert tok.decode(doc.tolist()) == tok.apply_chat_template(messages, tokenize=False)
    shortest = min(len(d) for d in docs)
    data = load_calibration(tok, [str(path)], 3, shortest)
    assert {tuple(r) for r in np.asarray(data.tokens).tolist()} == {
        tuple(d[:shortest].tolist()) for d in docs}


def test_chat_jsonl_run_on_smollm2_is_recorded(smollm_dir, tmp_path):
    from quantkit.api import quantize_directory
    from quantkit.recipe import Recipe

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    # GPTQ on the first block only (its Hessians come from the chat samples), RTN elsewhere.
    recipe = Recipe.from_dict({"default": {"strategy": "rtn", "bits": 4, "group_size": 64},
                               "rules": [{"match": "model.layers.0.*", "strategy": "gptq"}]})
    run = quantize_directory(smollm_dir, tmp_path / "q", recipe, calibration=[str(path)],
                             num_samples=3, seq_len=32, checkpoint=False)
    written = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    used = written["settings"]["calibration_data"]
    assert used["sources"] == [{"source": str(path), "format": "jsonl", "weight": 1.0,
                                "share": 1.0, "documents": 3, "source_tokens": used["sources"][0]["source_tokens"],
                                "samples": 3, "tokens": 96}]
    gptq = [r for r in run.report.layers if r.strategy == "gptq"]
    assert len(gptq) == 7 and all(r.n_tokens == 96 for r in gptq)


def test_messages_without_chat_template_is_one_line_error(stories_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    line = _cli_error(stories_dir, tmp_path, ["--calibration", str(path)])
    assert "has no chat template" in line and "chat.jsonl line 1" in line


# -- bad input: one line, no output --------------------------------------------------------------

def _cli_error(model_dir, tmp_path, extra) -> str:
    out = tmp_path / "o"
    result = runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--num-samples", "2",
                                 "--seq-len", "16", "--bits", "4", "--group-size", "32", *extra])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(("content", "expected"), [
    ('{"text": "a fine row of text"}\n{"text": oops}\n', "bad.jsonl line 2 is not JSON"),
    ('{"text": "a fine row"}\n\n{"prompt": "x"}\n', 'bad.jsonl line 3 has neither "text"'),
    ('["a list"]\n', 'line 1 has neither "text"'),
    ('{"messages": "hello"}\n', "line 1: messages must be a non-empty list"),
    ("\n\n", "is empty"),
    ('\n{"text": ""}\n', "fewer than one sequence of 16"),
    ('{"text": "short"}\n', "fewer than one sequence of 16"),
])
def test_bad_jsonl(stories_dir, tmp_path, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert expected in _cli_error(stories_dir, tmp_path, ["--calibration", str(bad)])


def test_bad_mixture_weights(stories_dir, tinystories_text, tmp_path):
    line = _cli_error(stories_dir, tmp_path, ["--calibration", f"{tinystories_text}:-0.5"])
    assert "mixture weight '-0.5'" in line and "not a positive number" in line
    line = _cli_error(stories_dir, tmp_path, ["--calibration", f"{tinystories_text}:half"])
    assert "mixture weight 'half'" in line
    line = _cli_error(stories_dir, tmp_path, ["--calibration", f"{tinystories_text}:0",
                                              "--calibration", "builtin:0"])
    assert "weights sum to 0" in line


# -- the whole run: mixture recorded, warnings, byte-identical ------------------------------------

def test_mixture_run_is_byte_identical_and_recorded(stories_dir, tinystories_text, tmp_path):
    chat = write_jsonl(tmp_path / "docs.jsonl", [{"text": line} for line in
                                                 tinystories_text.read_text().split("\n\n")[:300]])
    args = ["--calibration", f"{chat}:0.25", "--calibration", f"{tinystories_text}:0.75",
            "--num-samples", "8", "--seq-len", "64", "--bits", "4", "--group-size", "32", "-q"]
    outs = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["quantize", str(stories_dir), "-o", str(tmp_path / name), *args])
        assert result.exit_code == 0, result.output
        outs.append(tmp_path / name)
    files = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert files
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    used = json.loads((outs[0] / "quantization_report.json").read_text())["settings"]
    assert [(s["source"], s["weight"], s["samples"]) for s in used["calibration_data"]["sources"]] \
        == [(str(chat), 0.25, 2), (str(tinystories_text), 0.75, 6)]
    assert used["calibration"] == f"{chat}:0.25 + {tinystories_text}:0.75"


def test_calibration_warnings_on_stderr_and_in_report(stories_dir, tinystories_text, tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_text("\0" * 3000)
    result = runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(tmp_path / "q"), "--calibration", str(nul),
        "--num-samples", "1000", "--seq-len", "520", "--bits", "4", "--group-size", "32", "-q",
        "--fast"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert text.count("warning:") == 3
    assert "distinct tokens" in text and "--num-samples 1000 reduced to" in text
    assert "beyond the model's max_position_embeddings (512)" in text
    warnings = json.loads((tmp_path / "q" / "quantization_report.json").read_text())[
        "settings"]["calibration_data"]["warnings"]
    assert len(warnings) == 3 and all(w.split()[0] in text for w in warnings)
    # A normal text and run: no warning.
    quiet = runner.invoke(app, [
        "quantize", str(stories_dir), "-o", str(tmp_path / "ok"), "--calibration",
        str(tinystories_text), "--num-samples", "4", "--seq-len", "64", "--bits", "4",
        "--group-size", "32", "-q"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_builtin_texts_are_offline_and_named(stories_tokenizer):
    from quantkit.calibration import austen_text, builtin_text, pydoc_text, read_text

    prose = austen_text()
    assert prose.startswith("PRIDE AND PREJUDICE") and 300_000 < len(prose) < 400_000
    assert builtin_text() == read_text(None) == read_text("builtin") == prose
    assert read_text("builtin-pydoc") == pydoc_text() != prose
    default = load_calibration(stories_tokenizer, None, 4, 64)
    assert [s["source"] for s in default.sources] == ["builtin-austen"]
    assert np.array_equal(np.asarray(default.tokens),
                          np.asarray(load_calibration(stories_tokenizer, "builtin", 4, 64).tokens))
