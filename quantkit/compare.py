"""Model directories measured on one text: a model's perplexity (``quantkit eval``,
:func:`directory_perplexity`), several quantized models against their float reference (the rows
of ``quantkit eval --reference`` and ``quantkit compare``, :func:`compare_models`). Data only;
the CLI renders them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from .calibration import make_batches, read_text, tokenize
from .evaluate import Fidelity, MismatchError, fidelity, perplexity
from .report import REPORT_NAME, RunReport

#: Characters of the text whose token ids must agree between a model and its reference.
_PROBE_CHARS = 2000


@attrs.frozen
class ModelRow:
    """One model of a comparison: where it is, its size, and its fidelity to the reference."""

    model: str
    bits_per_weight: float
    size_bytes: int
    fidelity: Fidelity
    recipe: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bits_per_weight": self.bits_per_weight,
                "size_bytes": self.size_bytes, **self.fidelity.to_dict(), "recipe": self.recipe}


@attrs.frozen
class PerplexityRow:
    """One model's perplexity on ``num_samples × seq_len`` tokens of a text."""

    model: str
    perplexity: float
    text: str
    num_samples: int
    seq_len: int
    tokens: int
    quantized: bool
    bits_per_weight: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def size_on_disk(model_dir: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a model directory."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def recipe_summary(model_dir: str | Path) -> str:
    """One line from the directory's ``quantization_report.json``: strategies and the spread of
    (bits, group size) over layers, e.g. ``gptq ×35, skip ×1; 4b g64 ×35``; ``-`` without one."""
    if not (Path(model_dir) / REPORT_NAME).is_file():
        return "-"
    try:
        run = RunReport.read(model_dir)
    except (ValueError, TypeError, KeyError):
        return "- (unreadable report)"
    strategies = ", ".join(f"{k} ×{v}" for k, v in sorted(run.strategy_counts().items()))
    widths = Counter(f"{r.bits}b g{r.group_size}" + ("" if r.mode in (None, "affine") else f" {r.mode}")
                     for r in run.layers if r.status != "skipped" and r.bits is not None)
    spread = ", ".join(f"{k} ×{v}" for k, v in sorted(widths.items(), key=lambda kv: -kv[1]))
    return f"{strategies}; {spread}" if spread else strategies


def check_same_tokenizer(tokenizer: Any, reference: Any, text: str, name: str, ref_name: str) -> None:
    """Refuse two tokenizers that would number tokens differently: another vocabulary, or
    other ids for the start of ``text``."""
    def vocab(t: Any) -> dict[str, int] | None:
        try:
            return dict(t.get_vocab())
        except (AttributeError, TypeError, NotImplementedError):
            return None

    va, vb = vocab(tokenizer), vocab(reference)
    if va is not None and vb is not None and va != vb:
        raise MismatchError(
            f"{name} has another tokenizer than the reference {ref_name} ({len(va)} vs "
            f"{len(vb)} vocabulary entries{'' if len(va) != len(vb) else ', different ids'}); "
            "compare models quantized from the reference")
    sample = text[:_PROBE_CHARS]
    if list(tokenizer.encode(sample)) != list(reference.encode(sample)):
        raise MismatchError(
            f"{name} tokenizes the text differently from the reference {ref_name}; compare "
            "models quantized from the reference")


def eval_tokens(tokenizer: Any, text: str, num_samples: int, seq_len: int, seed: int) -> mx.array:
    """The evaluation windows (the same for every model of a comparison)."""
    ids = tokenize(tokenizer, text, max_tokens=num_samples * seq_len)
    return make_batches(ids, num_samples, seq_len, seed)


def compare_models(
    model_dirs: Sequence[str | Path], reference_dir: str | Path, text: str | Path | None, *,
    num_samples: int = 64, seq_len: int = 512, seed: int = 0, batch_size: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[ModelRow]:
    """Each model in ``model_dirs`` against the float model ``reference_dir`` on the same
    windows of ``text``: :func:`quantkit.evaluate.fidelity`, size and recipe. Models are loaded
    one at a time. Raises :class:`MismatchError` (before any model is evaluated) when one has
    another tokenizer than the reference."""
    from mlx_lm.utils import compute_bits_per_weight

    from .hub import resolve_model
    from .io import load_model

    reference, ref_tokenizer, _ = load_model(resolve_model(reference_dir), allow_quantized=True)
    body = read_text(text)
    tokens = eval_tokens(ref_tokenizer, body, num_samples, seq_len, seed)
    local = {str(d): resolve_model(d) for d in model_dirs}  # a path, or a Hugging Face repo id
    for d in model_dirs:  # refuse a mismatch before spending time on the others
        _, tokenizer, _ = load_model(local[str(d)], allow_quantized=True, lazy=True)
        check_same_tokenizer(tokenizer, ref_tokenizer, body, str(d), str(reference_dir))
    rows = []
    for d in model_dirs:
        model, _, _ = load_model(local[str(d)], allow_quantized=True)

        def step(done: int, total: int, name: str = str(d)) -> None:
            if progress is not None:
                progress(name, done, total)

        f = fidelity(model, reference, tokens, batch_size, progress=step)
        rows.append(ModelRow(model=str(d), bits_per_weight=float(compute_bits_per_weight(model)),
                             size_bytes=size_on_disk(local[str(d)]), fidelity=f,
                             recipe=recipe_summary(local[str(d)])))
        del model
    return rows


def directory_perplexity(
    model_dir: str | Path, text: str | Path | None, *, num_samples: int = 64, seq_len: int = 512,
    seed: int = 0, batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
) -> PerplexityRow:
    """Perplexity (:func:`quantkit.evaluate.perplexity`) of the model in ``model_dir`` (a
    directory or a Hugging Face repo id, quantized or not) on ``num_samples`` windows of
    ``seq_len`` tokens of ``text`` (``None``: the built-in text), chosen with ``seed``."""
    from mlx_lm.utils import compute_bits_per_weight

    from .hub import resolve_model
    from .io import load_model

    model, tokenizer, config = load_model(resolve_model(model_dir), allow_quantized=True)
    tokens = eval_tokens(tokenizer, read_text(text), num_samples, seq_len, seed)
    ppl = perplexity(model, tokens, batch_size, progress=progress)
    return PerplexityRow(
        model=str(model_dir), perplexity=ppl, text=str(text or "builtin"),
        num_samples=int(tokens.shape[0]), seq_len=seq_len,
        tokens=int(tokens.shape[0] * (seq_len - 1)), quantized=bool(config.get("quantization")),
        bits_per_weight=float(compute_bits_per_weight(model)),
    )
