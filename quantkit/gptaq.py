"""GPTAQ as a strategy: ``strategy = "gptaq"`` in a recipe (optional; GPTQ stays the default).

Its collector sees each layer's inputs twice per batch: first in the full-precision model
(``recording``: the walker runs the unquantized block on a second stream of block inputs), then
in the partly quantized model; it accumulates ``H = mean(x̃ x̃ᵀ)`` and ``D = mean((x − x̃) x̃ᵀ)``.
Cost over GPTQ: one more copy of the block inputs (the float stream) and one more ``(in, in)``
matrix per layer of the block being calibrated, plus one extra block forward per batch.
Layers outside the decoder blocks (the output head) get no reference and reduce to GPTQ.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import mlx.core as mx
import numpy as np

from .hessian import DenseHessianCollector, HessianStats
from .kernels.gptaq import asymmetry_matrix, gptaq_quantize
from .quantizers import GPTQQuantizer, QuantResult, refuse_unsupported, register_strategy


@attrs.frozen
class AsymmetricStats(HessianStats):
    """``h`` as for GPTQ (quantized-model inputs) plus ``d = mean((x − x̃) x̃ᵀ)``; ``d`` is
    ``None`` when no full-precision inputs were seen."""

    d: mx.array | None = None


class AsymmetricHessianCollector(DenseHessianCollector):
    """While ``recording`` is set, keeps the (full-precision) input it is shown; the next input
    (the quantized model's, same batch) updates ``H`` and ``D`` with it."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.d = mx.zeros((in_features, in_features), dtype=mx.float32)
        self.recording = False
        self._reference: mx.array | None = None
        self.n_paired = 0

    def update(self, x: mx.array) -> None:
        if self.recording:
            self._reference = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            return
        xq = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        m = xq.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        if self._reference is not None and self._reference.shape[0] == m:
            self.d = self.d * (self.n_tokens / total) + ((self._reference - xq).T @ xq) / total
            self.n_paired += m
        else:
            self.d = self.d * (self.n_tokens / total)
        self._reference = None
        super().update(x)

    def stats(self) -> AsymmetricStats:
        return AsymmetricStats(h=self.h, n_tokens=self.n_tokens,
                               d=self.d if self.n_paired else None)

    def arrays(self) -> list[mx.array]:
        return [self.h, self.d]


@register_strategy
@attrs.frozen
class GPTAQQuantizer(GPTQQuantizer):
    """GPTAQ: GPTQ that matches the full-precision model's outputs (asymmetric calibration).

    ``alpha`` scales the asymmetry correction (0 gives GPTQ); other options as for GPTQ,
    except ``act_order``, ``static_groups``, ``scale_search`` and ``compute``, which its solve
    does not honour: a recipe setting them is refused."""

    name: ClassVar[str] = "gptaq"
    needs_reference: ClassVar[bool] = True
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {"act_order", "static_groups", "scale_search", "compute"})

    alpha: float = attrs.field(default=0.25, validator=attrs.validators.ge(0.0))

    def __attrs_post_init__(self) -> None:
        refuse_unsupported(self)

    def collector(self, handler, module):
        return AsymmetricHessianCollector(handler.weight(module).shape[-1])

    def _solver(self, spec, stats, storage_dtype, factor=None):
        d = getattr(stats, "d", None)
        if spec.mode != "affine" or d is None or self.alpha == 0:
            return super()._solver(spec, stats, storage_dtype, factor)
        if factor is None:
            factor = self.inverse_strategy().factor(stats.h)
        d64 = np.array(d, dtype=np.float64)
        d64[:, np.diagonal(np.array(stats.h)) <= 0] = 0.0  # dead inputs carry no correction
        p = mx.array(asymmetry_matrix(np.array(factor.u, dtype=np.float64), d64,
                                      self.alpha).astype(np.float32))
        info = {"damping": factor.damping, "dead_inputs": factor.n_dead}

        def solve(w: mx.array) -> QuantResult:
            out = gptaq_quantize(w, factor.u, p, bits=spec.bits, group_size=spec.group_size,
                                 block_size=self.block_size, storage_dtype=storage_dtype)
            return QuantResult(spec=spec, dequantized=out.dequantized, codes=out.codes,
                               scales=out.scales, biases=out.biases)

        return solve, info
