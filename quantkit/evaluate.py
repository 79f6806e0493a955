"""Perplexity of a language model, and its fidelity to a reference (float) model.

Fidelity is measured per next-token position from both models' logits on identical windows:
KL(reference ‖ model), whether both most likely tokens agree, and each model's negative
log-likelihood. The kernels (:func:`logit_stats`, :func:`percentile`) are pure functions on
arrays; :func:`fidelity` runs the two models. Nothing holds full-vocabulary float32 logits for a
whole batch: each batch is run in slices of positions with a KV cache (so the output head only
ever produces ``batch × slice × vocab`` logits), and each slice's vocabulary is processed in
chunks (a chunked log-sum-exp, the KL accumulated chunk by chunk).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import EvaluationError, QuantkitError
from .interrupt import check

#: Vocabulary entries processed at once by :func:`logit_stats`.
VOCAB_CHUNK = 16384
#: Logits (batch × positions × vocabulary) one model produces at once in :func:`fidelity`.
MAX_LOGITS = 1 << 24


class MismatchError(QuantkitError, ValueError):
    """Two models that cannot be compared (another tokenizer or vocabulary)."""


def perplexity(
    model: nn.Module, tokens: mx.array, batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``tokens (n, seq_len)``."""
    total, count = 0.0, 0
    n = tokens.shape[0]
    for i in range(0, n, batch_size):
        check("eval")  # a place to stop at every batch (quantkit.interrupt)
        batch = tokens[i : i + batch_size]
        logits = model(batch[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")
        mx.eval(nll)
        total += cast(float, nll.item())
        count += batch[:, 1:].size
        if progress is not None:
            progress(min(i + batch_size, n), n)
    loss = total / count
    if not math.isfinite(loss) or loss > math.log(sys.float_info.max):
        raise EvaluationError(
            f"the mean loss is {loss:.4g} nats per token, so the perplexity is "
            f"{'not a number' if math.isnan(loss) else 'too large to represent'}: the model's "
            "outputs are broken (damaged weights or a failed quantization); check it with a "
            "full-precision run")
    return math.exp(loss)


# -- kernels ------------------------------------------------------------------------------------


def _chunks(v: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, v)) for s in range(0, v, max(chunk, 1))]


def logsumexp_chunked(logits: mx.array, chunk: int = VOCAB_CHUNK) -> tuple[mx.array, mx.array]:
    """``(log Σ exp, argmax)`` over the last axis of ``logits``, in float32, ``chunk`` columns at
    a time (an online log-sum-exp: running maximum, running sum rescaled when it grows)."""
    spans = _chunks(logits.shape[-1], chunk)
    if not spans:
        raise ValueError("empty vocabulary")
    x = logits[..., : spans[0][1]].astype(mx.float32)
    m = mx.max(x, axis=-1)
    s = mx.sum(mx.exp(x - m[..., None]), axis=-1)
    arg = mx.argmax(x, axis=-1).astype(mx.int32)
    for lo, hi in spans[1:]:
        x = logits[..., lo:hi].astype(mx.float32)
        cm = mx.max(x, axis=-1)
        ca = mx.argmax(x, axis=-1).astype(mx.int32) + lo
        new = mx.maximum(m, cm)
        s = s * mx.exp(m - new) + mx.sum(mx.exp(x - new[..., None]), axis=-1)
        arg = mx.where(cm > m, ca, arg)  # ties keep the first (lowest) index, as argmax does
        m = new
    return m + mx.log(s), arg


def logit_stats(
    ref_logits: mx.array, logits: mx.array, targets: mx.array | None = None,
    chunk: int = VOCAB_CHUNK,
) -> dict[str, mx.array]:
    """Per position (all axes but the last): ``kl`` = KL(softmax(ref) ‖ softmax(logits)) in nats,
    ``agree`` = 1.0 where both argmaxes are the same token, and with ``targets`` the negative
    log-likelihoods ``ref_nll`` and ``nll`` of the target tokens. Float32 throughout, the
    vocabulary ``chunk`` columns at a time."""
    if ref_logits.shape != logits.shape:
        raise MismatchError(f"logits of shape {tuple(logits.shape)} cannot be compared with the "
                            f"reference's {tuple(ref_logits.shape)}; compare models of one vocabulary")
    lse_p, arg_p = logsumexp_chunked(ref_logits, chunk)
    lse_q, arg_q = logsumexp_chunked(logits, chunk)
    shift = lse_p - lse_q
    kl = mx.zeros(lse_p.shape, dtype=mx.float32)
    for lo, hi in _chunks(logits.shape[-1], chunk):
        a = ref_logits[..., lo:hi].astype(mx.float32)
        b = logits[..., lo:hi].astype(mx.float32)
        log_p = a - lse_p[..., None]
        kl = kl + mx.sum(mx.exp(log_p) * (a - b - shift[..., None]), axis=-1)
    out = {"kl": mx.maximum(kl, 0.0), "agree": (arg_p == arg_q).astype(mx.float32)}
    if targets is not None:
        t = targets[..., None].astype(mx.int32)
        out["ref_nll"] = lse_p - mx.take_along_axis(ref_logits, t, axis=-1)[..., 0].astype(mx.float32)
        out["nll"] = lse_q - mx.take_along_axis(logits, t, axis=-1)[..., 0].astype(mx.float32)
    return out


def _total(x: mx.array) -> float:
    return cast(float, mx.sum(x).item())


def percentile(values: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, linear between the closest ranks."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("no values")
    pos = (v.size - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.size - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


# -- running both models ------------------------------------------------------------------------


@attrs.frozen
class Fidelity:
    """How close ``model`` is to ``reference`` on the same token windows, per next-token
    position: KL(reference ‖ model) mean and 99th percentile (nats), top-1 agreement (share of
    positions where both most likely tokens agree) and both perplexities."""

    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def fidelity(
    model: nn.Module, reference: nn.Module, tokens: mx.array, batch_size: int = 8, *,
    max_logits: int = MAX_LOGITS, vocab_chunk: int = VOCAB_CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> Fidelity:
    """Compare ``model`` with ``reference`` on ``tokens (n, seq_len)``: every next-token position
    of every window (the first token of a window is context only). Each batch runs through both
    models in slices of positions, earlier positions kept in a KV cache, so that neither model
    produces more than about ``max_logits`` logits at once."""
    from mlx_lm.models.cache import make_prompt_cache

    n = tokens.shape[0]
    kls: list[np.ndarray] = []
    agree = ref_nll = nll = 0.0
    count = 0
    for i in range(0, n, batch_size):
        check("eval")
        batch = tokens[i : i + batch_size]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        caches = make_prompt_cache(reference), make_prompt_cache(model)
        start, width = 0, 16  # the first slice tells the vocabulary size
        while start < inputs.shape[1]:
            stop = min(start + width, inputs.shape[1])
            ref_logits = reference(inputs[:, start:stop], cache=caches[0])
            logits = model(inputs[:, start:stop], cache=caches[1])
            stats = logit_stats(ref_logits, logits, targets[:, start:stop], vocab_chunk)
            mx.eval(stats)
            kls.append(np.asarray(stats["kl"], dtype=np.float64).ravel())
            agree += _total(stats["agree"])
            ref_nll += _total(stats["ref_nll"])
            nll += _total(stats["nll"])
            count += int(stats["kl"].size)
            width = max(16, max_logits // (batch.shape[0] * logits.shape[-1]))
            start = stop
            del ref_logits, logits, stats
        if progress is not None:
            progress(min(i + batch_size, n), n)
    kl = np.concatenate(kls)
    return Fidelity(kl_mean=float(kl.mean()), kl_p99=percentile(kl, 99.0),
                    top1_agreement=agree / count, perplexity=math.exp(nll / count),
                    reference_perplexity=math.exp(ref_nll / count), positions=count)
