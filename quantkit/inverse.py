"""Cholesky-inverse strategies: from a Hessian to the factor GPTQ's error feedback uses."""

from __future__ import annotations

import abc

import attrs
import mlx.core as mx
import numpy as np

from .errors import FactorizationError
from .kernels.blocked_cholesky import blocked_factor_mlx, prepare_hessian_mlx
from .kernels.linalg import BACKEND_NAMES, inverse_hessian_factor, prepare_hessian, resolve_backend


@attrs.frozen
class InverseFactor:
    """``u``: upper Cholesky factor of the damped inverse Hessian; ``damping``: the fraction of
    the mean diagonal that was added; ``n_dead``: inputs that never saw a non-zero activation."""

    u: mx.array
    damping: float
    n_dead: int


def _check_backend(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in BACKEND_NAMES:
        raise ValueError(f"linalg backend {value!r} is unknown; use one of {sorted(BACKEND_NAMES)}")


class InverseStrategy(abc.ABC):
    """Turns a Hessian into an :class:`InverseFactor`; raises :class:`FactorizationError` when
    it cannot."""

    @abc.abstractmethod
    def factor(self, h: mx.array) -> InverseFactor: ...


@attrs.frozen
class DampedCholesky(InverseStrategy):
    """One attempt: add ``damping · mean(diag H)`` and factorize.

    ``backend``: see :mod:`quantkit.kernels.linalg` (``"auto"``: NumPy float64 on CPU, the
    blocked GPU factorization on a GPU); ``block``: diagonal block size of ``"blocked"``."""

    damping: float = 0.01
    backend: str = attrs.field(default="auto", validator=_check_backend)
    block: int = 512

    def factor(self, h: mx.array) -> InverseFactor:
        if resolve_backend(self.backend) == "blocked":
            hd, _, n_dead = prepare_hessian_mlx(h, self.damping)
            u = blocked_factor_mlx(hd, self.block)
            return InverseFactor(u=u, damping=self.damping, n_dead=n_dead)
        hd, _, n_dead = prepare_hessian(np.array(h), self.damping)
        u = inverse_hessian_factor(hd, resolve_backend(self.backend))
        return InverseFactor(u=mx.array(u.astype(np.float32)), damping=self.damping, n_dead=n_dead)


@attrs.frozen
class EscalatingCholesky(InverseStrategy):
    """Start at ``damping``; on failure multiply it by ``growth``, up to ``max_attempts`` tries."""

    damping: float = 0.01
    growth: float = 10.0
    max_attempts: int = 5
    backend: str = attrs.field(default="auto", validator=_check_backend)
    block: int = 512

    def factor(self, h: mx.array) -> InverseFactor:
        damping = self.damping
        last: FactorizationError | None = None
        for _ in range(self.max_attempts):
            try:
                return DampedCholesky(damping, self.backend, self.block).factor(h)
            except FactorizationError as exc:
                last = exc
                damping *= self.growth
        raise FactorizationError(
            f"{last} (after {self.max_attempts} attempts, damping up to {damping / self.growth:g})"
        )
