"""Hessian collectors: accumulate what a quantizer needs from a layer's inputs."""

from __future__ import annotations

import abc

import attrs
import mlx.core as mx
import numpy as np

from .kernels.shrink import shrink


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


@attrs.frozen
class ExpertHessianStats(HessianStats):
    """What a :class:`PerExpertHessianCollector` gathered for one batch of experts.

    ``h (len(experts), in, in)``: each expert's mean ``x xᵀ`` over the rows routed to it (zeros
    for an expert that got none), or ``(1, in, in)`` — one Hessian for all — when collected
    ``shared``; ``expert_tokens``: rows each expert of ``experts`` received; ``n_tokens``: rows
    the layer received over all its experts (a token sent to ``k`` experts counts ``k`` times).
    """

    experts: tuple[int, ...] = ()
    expert_tokens: tuple[int, ...] = ()
    #: Rows the model's own router sent to the layer (all experts): ``n_tokens``, unless the
    #: statistics were collected with every token sent to every expert.
    routed_rows: int | None = None

    def expert(self, i: int) -> HessianStats:
        """The :class:`HessianStats` of ``experts[i]``."""
        h = self.h[0 if self.h.shape[0] == 1 else i]
        return HessianStats(h=h, n_tokens=self.expert_tokens[i])

    def share(self, i: int) -> float:
        """Fraction of the layer's routed rows that went to ``experts[i]``."""
        return self.expert_tokens[i] / self.n_tokens if self.n_tokens else 0.0


class PerExpertHessianCollector(HessianCollector):
    """One Hessian per expert of an expert layer (``SwitchLinear``), from the rows routed to it.

    ``update(x, indices)`` takes the layer's call arguments: ``x (..., rows, in)`` and expert
    ``indices`` broadcastable against ``x.shape[:-2]`` (``SwitchGLU`` calls its projections with
    either ``x (B, L, 1, 1, in)`` and ``indices (B, L, k)`` or, sorted, ``x (N·k, 1, in)`` and
    ``indices (N·k,)``). Only the Hessians of ``experts`` are held, so a layer with many experts
    can be collected a batch of experts at a time; token counts are kept for all experts.
    ``shared=True`` accumulates every row into one Hessian (mlx-lm's way), for comparison.

    ``all_experts=True``: the layer is called (by :class:`~quantkit.experts.AllExpertsCalibration`)
    once with every token sent to every expert of ``experts`` — those rows make the Hessians and
    ``expert_tokens`` — and once with the model's own routing, which :meth:`count_routed` only
    counts (``routed_rows``).
    """

    def __init__(
        self, in_features: int, num_experts: int, experts: range | None = None,
        shared: bool = False, all_experts: bool = False, shrinkage: float = 0.0,
    ) -> None:
        self.num_experts = num_experts
        self.experts = range(num_experts) if experts is None else experts
        if self.experts.step != 1 or self.experts.start < 0 or self.experts.stop > num_experts:
            raise ValueError(f"experts must be a contiguous range within 0..{num_experts}")
        self.shared = shared
        n_h = 1 if shared else len(self.experts)
        self.h = mx.zeros((n_h, in_features, in_features), dtype=mx.float32)
        self.counts = mx.zeros((num_experts,), dtype=mx.int32)
        self.all_experts = all_experts
        self.routed = mx.zeros((num_experts,), dtype=mx.int32)  # with all_experts only
        # shrinkage > 0: also the mean x xᵀ over every routed row, towards which each expert's
        # Hessian is shrunk by its token count (kernels.shrink).
        self.shrinkage = shrinkage
        self.h_all = None if shared or shrinkage == 0 else mx.zeros((in_features, in_features))

    def count_routed(self, x: mx.array, indices: mx.array) -> None:
        """Count the rows the model's own routing sends to each expert (no statistics)."""
        batch = mx.broadcast_shapes(x.shape[:-2], indices.shape)
        rows = x.shape[-2]
        idx = mx.broadcast_to(indices, batch).reshape(-1).astype(mx.int32)
        if idx.size:
            self.routed = self.routed + rows * mx.zeros_like(self.routed).at[idx].add(1)

    def update(self, x: mx.array, indices: mx.array) -> None:  # type: ignore[override]
        batch = mx.broadcast_shapes(x.shape[:-2], indices.shape)
        x = mx.broadcast_to(x, (*batch, *x.shape[-2:])).reshape(-1, x.shape[-1]).astype(mx.float32)
        rows = x.shape[0] // max(1, _prod(batch))
        idx = mx.broadcast_to(indices, batch).reshape(-1).astype(mx.int32)
        if rows != 1:
            idx = mx.repeat(idx, rows)
        if idx.size == 0:
            return
        new = mx.zeros((self.num_experts,), dtype=mx.int32).at[idx].add(1)
        e0, e1 = self.experts.start, self.experts.stop
        if self.shared:
            s = (x.T @ x)[None]
            old, now = mx.sum(self.counts), mx.sum(new)
        else:
            order = mx.argsort(idx)
            xs = x[order]
            ends = mx.cumsum(new)
            segments = mx.stack([ends - new, ends], axis=-1)[e0:e1].astype(mx.uint32)
            s = mx.segmented_mm(xs.T, xs, segments)
            old, now = self.counts[e0:e1], new[e0:e1]
        if self.h_all is not None:
            rows_old, rows_now = mx.sum(self.counts).astype(mx.float32), mx.sum(new)
            self.h_all = (self.h_all * (rows_old / mx.maximum(rows_old + rows_now, 1.0))
                          + (x.T @ x) / mx.maximum(rows_old + rows_now, 1.0))
        total = (old + now).astype(mx.float32)
        keep = mx.where(total > 0, old.astype(mx.float32) / mx.maximum(total, 1.0), 0.0)
        self.h = self.h * keep.reshape(-1, 1, 1) + s / mx.maximum(total, 1.0).reshape(-1, 1, 1)
        self.counts = self.counts + new

    def stats(self) -> ExpertHessianStats:
        counts = [int(c) for c in np.asarray(self.counts)]
        n_tokens = sum(counts)
        routed = n_tokens
        if self.all_experts:
            # Every expert of the layer takes every token (the batches' experts alike).
            n_tokens = max(counts) * self.num_experts
            routed = int(np.asarray(self.routed).sum())
        h = self.h
        if self.h_all is not None:
            h = shrink(h, mx.array([counts[e] for e in self.experts]), self.h_all, self.shrinkage)
        return ExpertHessianStats(
            h=h,
            n_tokens=n_tokens,
            experts=tuple(self.experts),
            expert_tokens=tuple(counts[e] for e in self.experts),
            routed_rows=routed,
        )

    def arrays(self) -> list[mx.array]:
        extra = [] if self.h_all is None else [self.h_all]
        return [self.h, self.counts, self.routed, *extra]


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
