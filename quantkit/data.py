"""Calibration data from several sources: plain text, JSONL (``text`` or chat ``messages``),
mixtures by share of tokens, and the warnings a run should show and record.

A source is a built-in text (``builtin``: the offline default; ``builtin-austen``,
``builtin-pydoc``: see :mod:`quantkit.calibration`; these names always mean the built-in texts,
write ``./builtin`` for a file of that name) or a file:
a file whose name ends in ``.jsonl`` is read as JSON Lines, one document per row, each row
``{"text": "..."}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the
tokenizer's chat template, :meth:`apply_chat_template`); any other file is one plain-text
document.

How documents become ``(num_samples, seq_len)`` samples:

* default (document-aligned): every sample starts at the beginning of a document. A document
  of at least ``seq_len`` tokens gives its own non-overlapping windows (no sample spans two
  documents); shorter documents are packed in file order, separated by the tokenizer's EOS
  token, and the pack is cut at ``seq_len``. Nothing is padded: the walker runs each block with
  the model's own causal mask and weighs every position in the Hessians, so a padded position
  would add to every layer's statistics; packing with separators keeps every position a real
  token.
* ``pack=True``: a source's documents are joined into one stream (separated by EOS) and cut
  into non-overlapping windows anywhere, as mlx-lm's GPTQ/AWQ data loading does: the most
  samples from a text.

A plain-text file is one document, so both give the windows quantkit always used.

Mixtures: each source's weight is its share of the calibration samples (all samples have
``seq_len`` tokens, so also of the tokens): ``num_samples · weight / total`` rounded by largest
remainder, so every source is within one sample of its share. A source with fewer windows than
its share needs lowers the total (the shares are kept) and says so in a warning. Windows are
chosen from each source with ``seed``; the same inputs give the same samples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from .calibration import DEFAULT_SOURCE, builtin_name
from .errors import CalibrationError


@attrs.frozen
class Source:
    """One calibration source: a file path or a built-in text's name, and its weight."""

    path: str
    weight: float = 1.0

    @property
    def is_builtin(self) -> bool:
        return builtin_name(self.path) is not None

    @property
    def format(self) -> str:
        return "jsonl" if self.path.lower().endswith(".jsonl") else "text"


def parse_source(spec: str) -> Source:
    """``PATH`` or ``PATH:WEIGHT`` as given to ``--calibration``.

    The rule: a spec that is a built-in text's name or an existing file as a whole is that
    source with weight 1, so a path containing ``:`` works; otherwise, when the part before the
    last ``:`` is one, the part after it is the weight, a number ≥ 0;
    otherwise the file does not exist."""
    spec = str(spec)
    if builtin_name(spec) or _exists(spec):
        return Source(builtin_name(spec) or spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and (builtin_name(head) or _exists(head)):
        try:
            weight = float(tail)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise CalibrationError(
                f"mixture weight {tail!r} of {head} is not a positive number; "
                f"write e.g. {head}:0.5")
        return Source(builtin_name(head) or head, weight)
    raise CalibrationError(f"calibration file {spec} does not exist; check the path "
                           "(a mixture entry is PATH:WEIGHT)")


def _exists(path: str) -> bool:
    return os.path.lexists(path)


@attrs.frozen
class Calibration:
    """What to calibrate on: sources (a mixture when several) and how documents are cut."""

    sources: tuple[Source, ...] = (Source(builtin_name(DEFAULT_SOURCE) or DEFAULT_SOURCE),)
    pack: bool = False

    @classmethod
    def from_specs(cls, specs: Sequence[str] | str | Path | None, pack: bool = False) -> Calibration:
        """From ``--calibration`` values (see :func:`parse_source`); none: the built-in text."""
        if specs is None:
            specs = []
        elif isinstance(specs, (str, Path)):
            specs = [str(specs)]
        sources = tuple(parse_source(str(s)) for s in specs) or cls().sources
        return cls(sources, pack)

    def describe(self) -> str:
        if len(self.sources) == 1 and self.sources[0].weight == 1.0:
            return self.sources[0].path
        return " + ".join(f"{s.path}:{s.weight:g}" for s in self.sources)


@attrs.frozen
class CalibrationData:
    """The calibration samples and what made them (for the run report)."""

    tokens: mx.array
    sources: tuple[dict[str, Any], ...]
    pack: bool
    warnings: tuple[str, ...] = ()

    def to_report(self) -> dict[str, Any]:
        n, seq_len = self.tokens.shape
        return {"pack": self.pack, "samples": int(n), "seq_len": int(seq_len),
                "tokens": int(n * seq_len), "sources": [dict(s) for s in self.sources],
                "warnings": list(self.warnings)}


def read_documents(source: Source, tokenizer) -> list[np.ndarray]:
    """The token ids of every document of ``source``."""
    from .calibration import builtin_text, read_text

    if source.is_builtin:
        return [_encode(tokenizer, builtin_text(source.path))]
    if source.format == "text":
        return [_encode(tokenizer, read_text(source.path))]
    path = Path(source.path)
    lines = read_text(path).splitlines()  # the same checks as a text file's (exists, UTF-8, ...)
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {number} is not JSON ({exc.msg}); "
                                   "each line must be one JSON object") from None
        docs.append(_row_ids(row, tokenizer, path, number))
    return docs  # not empty: read_text refused a file of blank lines


def _row_ids(row: Any, tokenizer, path: Path, number: int) -> np.ndarray:
    where = f"{path} line {number}"
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return _encode(tokenizer, row["text"])
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            raise CalibrationError(f"{where}: messages must be a non-empty list of "
                                   '{"role": ..., "content": ...} objects with string values')
        return np.asarray(render_chat(tokenizer, messages, where), dtype=np.int32)
    raise CalibrationError(f'{where} has neither "text" (a string) nor "messages"; '
                           'write {"text": ...} or {"messages": [{"role": ..., "content": ...}]}')


def render_chat(tokenizer, messages: list[dict[str, str]], where: str = "") -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, exactly as
    ``tokenizer.apply_chat_template(messages)`` gives them (the template writes the special
    tokens; none are added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(
            f"{where}: this model's tokenizer has no chat template to render messages with; "
            'give the rows as {"text": ...} instead')
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template error (jinja): name the row
        raise CalibrationError(f"{where}: the chat template could not render these messages "
                               f"({type(exc).__name__}: {exc})") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _windows(docs: list[np.ndarray], seq_len: int, pack: bool, sep: list[int]) -> np.ndarray:
    """Every candidate sample ``(n, seq_len)`` of one source, in document order."""
    sep_ids = np.asarray(sep, dtype=np.int32)
    if pack:
        parts = [p for d in docs for p in (d, sep_ids)][:-1] if docs else []
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        n = len(stream) // seq_len
        return stream[: n * seq_len].reshape(n, seq_len)
    out: list[np.ndarray] = []
    buffer: list[np.ndarray] = []
    filled = 0
    for d in docs:
        if len(d) >= seq_len:
            n = len(d) // seq_len
            out.extend(d[: n * seq_len].reshape(n, seq_len))
            continue
        if buffer:
            buffer.append(sep_ids)
            filled += len(sep_ids)
        buffer.append(d)
        filled += len(d)
        if filled >= seq_len:
            out.append(np.concatenate(buffer)[:seq_len])
            buffer, filled = [], 0
    return np.stack(out).astype(np.int32) if out else np.zeros((0, seq_len), np.int32)


def quotas(weights: Sequence[float], n: int) -> list[int]:
    """``n`` split by ``weights`` (largest remainder): each part within one of its share."""
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
    for i in order[: n - sum(parts)]:
        parts[i] += 1
    return parts


def load_calibration(
    tokenizer, calibration: Calibration | Sequence[str] | str | Path | None = None,
    num_samples: int = 128, seq_len: int = 512, seed: int = 0,
    max_positions: int | None = None,
) -> CalibrationData:
    """Read, tokenize and cut the calibration sources into samples (see the module docstring).

    ``max_positions``: the model's ``max_position_embeddings``; a longer ``seq_len`` is warned
    about. Warnings (also: fewer samples than asked, a text of almost no distinct tokens) are
    returned in :attr:`CalibrationData.warnings`; nothing is printed."""
    if seq_len < 2:
        raise CalibrationError(f"sequence length {seq_len} is too short; use at least 2")
    if num_samples < 1:
        raise CalibrationError(f"--num-samples {num_samples} must be at least 1")
    if not isinstance(calibration, Calibration):
        calibration = Calibration.from_specs(calibration)  # type: ignore[arg-type]
    sources = calibration.sources
    for s in sources:
        if not math.isfinite(s.weight) or s.weight < 0:
            raise CalibrationError(f"mixture weight {s.weight!r} of {s.path} is not a positive number")
    if sum(s.weight for s in sources) <= 0:
        raise CalibrationError("the calibration mixture's weights sum to 0; give at least one "
                               "source a positive weight")
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos is None else [int(eos)]
    candidates, docs_info = [], []
    for s in sources:
        docs = read_documents(s, tokenizer)
        windows = _windows(docs, seq_len, calibration.pack, sep)
        total = int(sum(len(d) for d in docs))
        if s.weight > 0 and len(windows) == 0:
            what = "" if len(docs) == 1 else f" in {len(docs)} documents"
            raise CalibrationError(
                f"calibration text {s.path} has {total} tokens{what}, fewer than one sequence "
                f"of {seq_len}; pass more text or a smaller --seq-len"
                + ("" if calibration.pack or len(docs) == 1 else ", or --pack"))
        candidates.append(windows)
        docs_info.append((len(docs), total))
    weights = [s.weight for s in sources]
    warnings = []
    n = num_samples
    while n > 0 and any(q > len(c) for q, c in zip(quotas(weights, n), candidates)):
        n -= 1
    if n < num_samples:
        short = [f"{s.path} gives {len(c)}" for s, c, q in zip(
            sources, candidates, quotas(weights, num_samples)) if q > len(c)]
        warnings.append(
            f"--num-samples {num_samples} reduced to {n}: " + ", ".join(short)
            + f" samples of {seq_len} tokens" + ("" if len(sources) == 1 else
                                                  " (the mixture's shares are kept)"))
    chosen, records = [], []
    for s, c, (n_docs, total), k in zip(sources, candidates, docs_info, quotas(weights, n)):
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.permutation(len(c))[:k])
        chosen.append(c[pick])
        records.append({"source": s.path, "format": s.format, "weight": s.weight,
                        "share": s.weight / sum(weights), "documents": n_docs,
                        "source_tokens": total, "samples": int(k), "tokens": int(k * seq_len)})
    tokens = np.concatenate(chosen)
    warnings += _content_warnings(tokens, tokenizer, seq_len, max_positions)
    return CalibrationData(mx.array(tokens), tuple(records), calibration.pack, tuple(warnings))


def _content_warnings(tokens: np.ndarray, tokenizer, seq_len: int,
                      max_positions: int | None) -> list[str]:
    out = []
    distinct = len(np.unique(tokens))
    vocab = getattr(tokenizer, "vocab_size", None) or 1 << 30
    if distinct < min(32, tokens.size / 16, vocab / 16):
        out.append(f"the calibration samples hold only {distinct} distinct tokens in "
                   f"{tokens.size}: the Hessians will describe almost no inputs; "
                   "pass real text with --calibration")
    if max_positions is not None and seq_len > max_positions:
        out.append(f"--seq-len {seq_len} is beyond the model's max_position_embeddings "
                   f"({max_positions}): positions past it were never trained; use "
                   f"--seq-len {max_positions} or less")
    return out
