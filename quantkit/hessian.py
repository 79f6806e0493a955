"""Hessian collectors: accumulate what a quantizer needs from a layer's inputs."""

from __future__ import annotations

import abc

import attrs
import mlx.core as mx


@attrs.frozen
class HessianStats:
    """``h``: mean of ``x xᵀ`` over the ``n_tokens`` inputs a layer saw (float32, ``(in, in)``)."""

    h: mx.array
    n_tokens: int


class HessianCollector(abc.ABC):
    """Accumulates statistics of a layer's inputs during calibration forward passes.

    ``update`` is called with the layer's input on every forward pass; ``stats`` returns what was
    gathered. Subclass to gather something else (e.g. per-expert Hessians, activation norms).
    """

    @abc.abstractmethod
    def update(self, x: mx.array) -> None:
        """Add one batch of inputs ``x (..., in)``."""

    @abc.abstractmethod
    def stats(self) -> HessianStats:
        """What was gathered so far."""

    def arrays(self) -> list[mx.array]:
        """Arrays to evaluate after a batch, so lazy graphs do not grow across batches."""
        return []


class DenseHessianCollector(HessianCollector):
    """``XᵀX`` in float32, kept as a running mean so long calibrations neither overflow nor lose
    small contributions to a huge running sum."""

    def __init__(self, in_features: int) -> None:
        self.h = mx.zeros((in_features, in_features), dtype=mx.float32)
        self.n_tokens = 0

    def update(self, x: mx.array) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        self.h = self.h * (self.n_tokens / total) + (x.T @ x) / total
        self.n_tokens = total

    def stats(self) -> HessianStats:
        return HessianStats(h=self.h, n_tokens=self.n_tokens)

    def arrays(self) -> list[mx.array]:
        return [self.h]
