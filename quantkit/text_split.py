r"""Where a long text can be cut so that its pieces, tokenized one by one, give exactly the tokens
of the whole text: the rule is read from ``tokenizer.json`` (data, not code per tokenizer).

Encoding a calibration text is one call into the ``tokenizers`` library, on one core: ~0.9 s for
WikiText-2's test split. Cut where no token can span the cut, the pieces are encoded in parallel
(``encode_batch``) and their tokens concatenated. Two layouts are recognised:

* ``"space"``, SentencePiece-style BPE (Llama-2, TinyLlama, stories260K): the normalizer prepends
  ``▁`` and replaces spaces by ``▁``, there is no pre-tokenizer (BPE runs on the whole text), and
  no vocabulary entry holds ``▁`` after its first character. Then no merge reaches across a ``▁``
  from its left: cutting just before a space and dropping that space (the next piece's own
  ``▁`` prefix stands for it) gives the same characters and the same tokens.
* ``"byte-level"``, byte-level BPE with GPT-2's pre-tokenizer regex (GPT-2, SmolLM2, ...; a
  ``Digits`` split before it is local too), no normalizer, no prefix space: the regex always
  starts a pre-token at a space followed by a letter (`` ?\p{L}+``; the whitespace before it
  ends the previous one, at the end of a piece as in the whole text), so cutting before such a
  space, which stays at the start of the next piece, is a pre-token boundary BPE never crosses.

Anything else (other normalizers, ``Split`` patterns such as Llama-3's or Qwen's, added tokens
holding the cut character) gets ``None``: the text is encoded whole."""

from __future__ import annotations

from typing import Any

#: Texts shorter than this are encoded whole (cutting would not pay).
MIN_CHARS = 64 * 1024
#: Smallest piece: about this many characters.
MIN_PIECE = 32 * 1024

_METASPACE = "\u2581"


def split_rule(spec: dict[str, Any]) -> str | None:
    """``"space"``, ``"byte-level"`` or ``None`` for the parsed ``tokenizer.json`` ``spec``."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return None
    added = [str(t.get("content", "")) for t in spec.get("added_tokens") or []]
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if pre is None and _is_metaspace_normalizer(normalizer):
        vocab = model.get("vocab") or {}
        if any(_METASPACE in token[1:] for token in vocab) or any(" " in t for t in added):
            return None
        return "space"
    if normalizer is None and _is_gpt2_byte_level(pre):
        return None if any(" " in t for t in added) else "byte-level"
    return None


def _is_metaspace_normalizer(spec: Any) -> bool:
    if not isinstance(spec, dict) or spec.get("type") != "Sequence":
        return False
    steps = spec.get("normalizers") or []
    return len(steps) == 2 and steps[0] == {"type": "Prepend", "prepend": _METASPACE} and steps[1] == {
        "type": "Replace", "pattern": {"String": " "}, "content": _METASPACE}


def _is_gpt2_byte_level(spec: Any) -> bool:
    def byte_level(step: Any) -> bool:
        return (isinstance(step, dict) and step.get("type") == "ByteLevel"
                and step.get("use_regex", True) and not step.get("add_prefix_space", False))

    if byte_level(spec):
        return True
    if not isinstance(spec, dict) or spec.get("type") != "Sequence":
        return False
    steps = spec.get("pretokenizers") or []
    return (len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True}
            and byte_level(steps[1]))


def _cut_at(text: str, i: int, rule: str) -> bool:
    """Whether ``rule`` allows a cut before ``text[i]``."""
    if text[i] != " " or i + 1 >= len(text):
        return False
    return rule == "space" or text[i + 1].isalpha()


def split_text(text: str, rule: str, pieces: int) -> list[str]:
    """``text`` in at most ``pieces`` pieces cut where ``rule`` allows (with ``"space"`` the
    space at each cut is dropped: the next piece's ``▁`` prefix stands for it); ``[text]`` when
    the text is short or no cut is found."""
    if len(text) < MIN_CHARS or pieces < 2:
        return [text]
    step = max(MIN_PIECE, len(text) // pieces)
    out: list[str] = []
    start = 0
    target = step
    while target < len(text):
        i = target
        limit = min(len(text), target + step)
        while i < limit and not _cut_at(text, i, rule):
            i += 1
        if i >= limit:
            target = limit
            continue
        out.append(text[start:i])
        start = i + 1 if rule == "space" else i
        target = start + step
    out.append(text[start:])
    return out
