"""Calibration data: text → ``(num_samples, seq_len)`` token batches, offline by default.

The default source needs no download: ``builtin-austen``, the first 360 KB of Jane Austen's
*Pride and Prejudice* (1813, public domain), shipped gzipped in the package (131 KB). It
replaced ``builtin-pydoc`` — the Python documentation inside every CPython installation
(``pydoc_data.topics``, ~460 KB of English prose with code), still available by that name —
after measurement: see docs/calibration.md. ``builtin`` names the default. Pass any plain-text
file instead for better domain match; JSONL (text or chat messages) and mixtures are read by
:mod:`quantkit.data`.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CalibrationError
from .validate import check_input_file

DEFAULT_SOURCE = "builtin"
#: What ``builtin`` (and no ``--calibration``) means.
DEFAULT_BUILTIN = "builtin-austen"


def pydoc_text() -> str:
    """Python's bundled documentation topics (the text behind ``help()``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - stripped-down Python builds
        raise CalibrationError(
            "this Python has no pydoc_data module for the builtin-pydoc calibration text; "
            "pass --calibration FILE"
        ) from exc
    return "\n\n".join(topics[k] for k in sorted(topics))


def austen_text() -> str:
    """The first 360 KB of *Pride and Prejudice* (public domain), shipped in the package."""
    data = resources.files("quantkit").joinpath("texts", "pride_and_prejudice.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


#: The offline texts by name.
BUILTIN_TEXTS = {"builtin-austen": austen_text, "builtin-pydoc": pydoc_text}


def builtin_name(source: str) -> str | None:
    """The canonical name of a built-in text (``builtin`` is the default's), else ``None``."""
    if source == DEFAULT_SOURCE:
        return DEFAULT_BUILTIN
    return source if source in BUILTIN_TEXTS else None


def builtin_text(name: str = DEFAULT_SOURCE) -> str:
    """A built-in calibration text: the offline default, or one named in :data:`BUILTIN_TEXTS`."""
    return BUILTIN_TEXTS[builtin_name(name) or DEFAULT_BUILTIN]()


def read_text(source: str | Path | None) -> str:
    """Text of ``source``: a file path, ``None``/``"builtin"`` for the offline default, or the
    name of another built-in text (``builtin-pydoc``)."""
    if source is None or builtin_name(str(source)):
        return builtin_text(DEFAULT_SOURCE if source is None else str(source))
    path = check_input_file(source, "calibration file", CalibrationError)  # a directory, pipe, device
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text; pass a plain-text file") from None
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty; pass a file with text")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of ``text``; long texts are cut (by characters, generously) before encoding."""
    if max_tokens is not None:
        text = text[: max(max_tokens * 12, 4096)]
    ids = tokenizer.encode(text)
    return np.asarray(ids, dtype=np.int32)


def make_batches(
    ids: np.ndarray, num_samples: int, seq_len: int, seed: int = 0
) -> mx.array:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens, chosen with ``seed``.

    Raises when the text is shorter than one window; uses every window when there are fewer
    than requested (the caller can compare ``len(result)`` with ``num_samples``)."""
    if seq_len < 2:
        raise CalibrationError(f"sequence length {seq_len} is too short; use at least 2")
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "pass more text or a smaller --seq-len"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(n_windows)[: min(num_samples, n_windows)])
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)[chosen]
    return mx.array(windows)


def calibration_tokens(
    tokenizer, source=None, num_samples: int = 128, seq_len: int = 512, seed: int = 0,
) -> mx.array:
    """Everything in one call: read, tokenize, cut into samples. ``source``: a file path,
    ``None``/``"builtin"``, a list of ``PATH[:WEIGHT]`` (a mixture) or a
    :class:`~quantkit.data.Calibration` (see :func:`quantkit.data.load_calibration`, which
    also returns what was used and any warnings)."""
    from .data import load_calibration

    return load_calibration(tokenizer, source, num_samples, seq_len, seed).tokens


#: The default number of calibration sequences per forward pass (on a CPU, and at least this
#: many on a GPU).
CPU_BATCH = 8
#: On a GPU, a batch is as many sequences (from :data:`CPU_BATCH` up to :data:`GPU_MAX_BATCH`)
#: as keep its widest float32 activation within this many bytes: 16 sequences of 512 tokens for
#: a Qwen3-0.6B shape (whose widest are its attention scores, 16 heads × 512 per token), 8 for
#: 8B-class shapes and larger or for longer sequences (what every model used before). Larger
#: batches mean fewer, larger GPU operations (benchmarks/README.md, session 27).
GPU_BATCH_BYTES = 256 * 2**20
GPU_MAX_BATCH = 32


def auto_batch_size(model, seq_len: int, device: mx.Device | None = None) -> int:
    """Calibration sequences per forward pass when none is given: :data:`CPU_BATCH` on a CPU;
    on a GPU, see :data:`GPU_BATCH_BYTES`. A token's widest activation is the widest linear
    layer of the first decoder block (input or output) or its attention scores (heads ×
    ``seq_len``)."""
    from .arch import decoder_blocks

    if (device or mx.default_device()) == mx.cpu:
        return CPU_BATCH
    blocks = decoder_blocks(model)
    widths = [max(m.weight.shape[-2:]) for _, m in (blocks[0].named_modules() if blocks else [])
              if isinstance(getattr(m, "weight", None), mx.array) and m.weight.ndim >= 2]
    heads = getattr(getattr(model, "args", None), "num_attention_heads", 0) or 0
    per_sequence = seq_len * max([*widths, heads * seq_len, 1]) * 4
    return max(CPU_BATCH, min(GPU_MAX_BATCH, GPU_BATCH_BYTES // per_sequence))
