"""Cholesky-inverse strategies: from a Hessian to the factor GPTQ's error feedback uses."""

from __future__ import annotations

import abc

import attrs
import mlx.core as mx
import numpy as np

from .errors import FactorizationError
from .kernels.linalg import BACKENDS, inverse_hessian_factor, prepare_hessian


@attrs.frozen
class InverseFactor:
    """``u``: upper Cholesky factor of the damped inverse Hessian; ``damping``: the fraction of
    the mean diagonal that was added; ``n_dead``: inputs that never saw a non-zero activation."""

    u: mx.array
    damping: float
    n_dead: int


def _check_backend(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in BACKENDS:
        raise ValueError(f"linalg backend {value!r} is unknown; use one of {sorted(BACKENDS)}")


class InverseStrategy(abc.ABC):
    """Turns a Hessian into an :class:`InverseFactor`; raises :class:`FactorizationError` when
    it cannot."""

    @abc.abstractmethod
    def factor(self, h: mx.array) -> InverseFactor: ...


@attrs.frozen
class DampedCholesky(InverseStrategy):
    """One attempt: add ``damping · mean(diag H)`` and factorize."""

    damping: float = 0.01
    backend: str = attrs.field(default="numpy", validator=_check_backend)

    def factor(self, h: mx.array) -> InverseFactor:
        hd, _, n_dead = prepare_hessian(np.array(h), self.damping)
        u = inverse_hessian_factor(hd, self.backend)
        return InverseFactor(u=mx.array(u.astype(np.float32)), damping=self.damping, n_dead=n_dead)


@attrs.frozen
class EscalatingCholesky(InverseStrategy):
    """Start at ``damping``; on failure multiply it by ``growth``, up to ``max_attempts`` tries."""

    damping: float = 0.01
    growth: float = 10.0
    max_attempts: int = 5
    backend: str = attrs.field(default="numpy", validator=_check_backend)

    def factor(self, h: mx.array) -> InverseFactor:
        damping = self.damping
        last: FactorizationError | None = None
        for _ in range(self.max_attempts):
            try:
                return DampedCholesky(damping, self.backend).factor(h)
            except FactorizationError as exc:
                last = exc
                damping *= self.growth
        raise FactorizationError(
            f"{last} (after {self.max_attempts} attempts, damping up to {damping / self.growth:g})"
        )
