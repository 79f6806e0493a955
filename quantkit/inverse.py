"""Cholesky-inverse strategies: from a Hessian to the factor GPTQ's error feedback uses."""

from __future__ import annotations

import abc
from collections.abc import Callable

import attrs
import mlx.core as mx
import numpy as np

from .errors import FactorizationError
from .kernels.blocked_cholesky import factor_steps, prepare_steps, run_together
from .kernels.linalg import BACKEND_NAMES, inverse_hessian_factor, prepare_hessians, resolve_backend


@attrs.frozen
class InverseFactor:
    """``u``: upper Cholesky factor of the damped inverse Hessian; ``damping``: the fraction of
    the mean diagonal that was added; ``n_dead``: inputs that never saw a non-zero activation."""

    u: mx.array
    damping: float
    n_dead: int
    #: the order the Hessian's rows and columns were permuted to before factorizing (GPTQ's
    #: act-order), ``None`` for none.
    order: tuple[int, ...] | None = None


def _check_backend(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in BACKEND_NAMES:
        raise ValueError(f"linalg backend {value!r} is unknown; use one of {sorted(BACKEND_NAMES)}")


def _outcome(attempt: Callable[[], InverseFactor]) -> InverseFactor | FactorizationError:
    """What ``attempt`` returns, or the :class:`FactorizationError` it raises."""
    try:
        return attempt()
    except FactorizationError as exc:
        return exc


class InverseStrategy(abc.ABC):
    """Turns a Hessian into an :class:`InverseFactor`; raises :class:`FactorizationError` when
    it cannot."""

    @abc.abstractmethod
    def factor(self, h: mx.array) -> InverseFactor: ...

    def factor_permuted(self, h: mx.array, perm: np.ndarray) -> InverseFactor:
        """:meth:`factor` of ``h`` with its rows and columns permuted by ``perm`` (GPTQ's
        act-order); override to permute without a permuted copy of ``h``."""
        index = mx.array(perm)
        return self.factor(h[index][:, index])

    def factor_alone(self, h: mx.array, perm: np.ndarray | None) -> InverseFactor:
        """:meth:`factor` (``perm`` ``None``) or :meth:`factor_permuted`."""
        return self.factor(h) if perm is None else self.factor_permuted(h, perm)

    @property
    def together(self) -> bool:
        """Whether :meth:`factor_together` does better than one matrix after the other (a
        caller may then hand it the matrices it would factorize one by one)."""
        return False

    def factor_together(self, hs: list[tuple[mx.array, np.ndarray | None]]
                        ) -> list[InverseFactor | FactorizationError]:
        """One outcome per ``(h, perm)`` (matrices of any sizes; ``perm`` ``None`` or an
        order): what :meth:`factor` / :meth:`factor_permuted` gives it alone, or the
        :class:`FactorizationError` it raises. Loops over them; override to factorize them at
        once (and set :attr:`together`)."""
        return [_outcome(lambda h=h, perm=perm: self.factor_alone(h, perm)) for h, perm in hs]

    def factor_many(self, hs: mx.array) -> list[InverseFactor | FactorizationError]:
        """One outcome per matrix of the stack ``hs (E, n, n)``: what :meth:`factor` gives it
        alone, or the :class:`FactorizationError` it raises. Loops over :meth:`factor`;
        override to factorize the stack at once."""
        return [_outcome(lambda i=i: self.factor(hs[i])) for i in range(hs.shape[0])]


@attrs.frozen
class DampedCholesky(InverseStrategy):
    """One attempt: add ``damping · mean(diag H)`` and factorize.

    ``backend``: see :mod:`quantkit.kernels.linalg` (``"auto"``: NumPy float64 on CPU, the
    blocked GPU factorization on a GPU); ``block``: diagonal block size of ``"blocked"``.

    :meth:`factor_many` with ``"blocked"`` factorizes the whole stack at once (one host
    round-trip per diagonal block for all matrices, matmuls over the stack); if that fails, each
    matrix on its own. The host backends go one matrix at a time: LAPACK does so inside a stack
    too, and stacks of ``E·n²`` float64 only add memory traffic (0.6× at ``E = 32, n = 2048``
    on a CPU, ``benchmarks/factor_batch.py``)."""

    damping: float = 0.01
    backend: str = attrs.field(default="auto", validator=_check_backend)
    block: int = 512
    #: Diagonal block size of ``"blocked"`` in :meth:`factor_many` (expert stacks): measured on
    #: an H200, 32 experts at n = 768 / 2048 took 0.27 / 0.91 s with 128 against 0.54 / 1.68 s
    #: with 512 (``benchmarks/factor_batch.py``); one large matrix prefers 512.
    stack_block: int = 128

    @property
    def together(self) -> bool:
        return resolve_backend(self.backend) == "blocked"

    def factor(self, h: mx.array) -> InverseFactor:
        return self.factor_stack(h[None])[0]

    def factor_together(self, hs: list[tuple[mx.array, np.ndarray | None]]
                        ) -> list[InverseFactor | FactorizationError]:
        """On the ``"blocked"`` backend the matrices are factorized in lockstep (one wait for
        the device per diagonal block of the largest, instead of one per block of each: the
        same arithmetic, so the same factors as one at a time); if any fails, each alone."""
        if not self.together:
            return super().factor_together(hs)
        try:
            return [f[0] for f in run_together([self._blocked_steps(h[None], self.block, perm)
                                                for h, perm in hs])]
        except FactorizationError:
            return super().factor_together(hs)

    def factor_permuted(self, h: mx.array, perm: np.ndarray) -> InverseFactor:
        return self.factor_stack(h[None], perm=perm)[0]

    def factor_many(self, hs: mx.array) -> list[InverseFactor | FactorizationError]:
        if resolve_backend(self.backend) != "blocked":
            return super().factor_many(hs)
        try:
            return list(self.factor_stack(hs, self.stack_block))
        except FactorizationError:
            # Each matrix alone, with the same arithmetic: an expert's factor never depends on
            # which other experts shared its stack (or on how many processes split them).
            return [_outcome(lambda h=h: self.factor_stack(h[None], self.stack_block)[0])
                    for h in hs]

    def factor_stack(self, hs: mx.array, block: int | None = None,
                     perm: np.ndarray | None = None) -> list[InverseFactor]:
        """Factors of every matrix of ``hs (E, n, n)`` (rows and columns permuted by ``perm``
        when given), computed together (diagonal blocks of ``block``, default :attr:`block`);
        raises :class:`FactorizationError` when any matrix cannot be factorized."""
        backend = resolve_backend(self.backend)
        if backend == "blocked":
            return run_together([self._blocked_steps(hs, block or self.block, perm)])[0]
        # prepare_hessians makes its own float64 copy (permuted as it copies): read hs in
        # place (no float32 copy), and let the factor overwrite that copy (one n² float64
        # matrix at a time).
        hd64, _, n_dead = prepare_hessians(np.asarray(hs), self.damping, perm)
        u32 = inverse_hessian_factor(hd64, backend, overwrite=True).astype(np.float32)
        del hd64  # (the float64 factor) before MLX copies the float32 one
        u = mx.array(u32)
        del u32
        return self._factors(u, n_dead, perm)

    def _factors(self, u: mx.array, n_dead: np.ndarray, perm: np.ndarray | None
                 ) -> list[InverseFactor]:
        order = None if perm is None else tuple(int(i) for i in perm)
        return [InverseFactor(u=u[i], damping=self.damping, n_dead=int(n_dead[i]), order=order)
                for i in range(u.shape[0])]

    def _blocked_steps(self, hs: mx.array, block: int, perm: np.ndarray | None):
        """:meth:`factor_stack` on the ``"blocked"`` backend as the kernels' steps
        (:func:`~quantkit.kernels.blocked_cholesky.run_together`)."""
        if perm is not None:
            index = mx.array(perm)
            hs = hs[:, index][:, :, index]
        hd, _, n_dead = yield from prepare_steps(hs, self.damping)
        u = yield from factor_steps(hd, block)
        return self._factors(u, n_dead, perm)


@attrs.frozen
class EscalatingCholesky(InverseStrategy):
    """Start at ``damping``; on failure multiply it by ``growth``, up to ``max_attempts`` tries.

    :meth:`factor_many`: :meth:`DampedCholesky.factor_many` at ``damping``, then each matrix
    that failed escalates on its own (every matrix ends with what :meth:`factor` gives it)."""

    damping: float = 0.01
    growth: float = 10.0
    max_attempts: int = 5
    backend: str = attrs.field(default="auto", validator=_check_backend)
    block: int = 512

    def factor(self, h: mx.array) -> InverseFactor:
        return self._escalate(lambda strategy: strategy.factor(h))

    def factor_permuted(self, h: mx.array, perm: np.ndarray) -> InverseFactor:
        return self._escalate(lambda strategy: strategy.factor_permuted(h, perm))

    def _escalate(self, attempt: Callable[[DampedCholesky], InverseFactor]) -> InverseFactor:
        damping = self.damping
        last: FactorizationError | None = None
        for _ in range(self.max_attempts):
            try:
                return attempt(DampedCholesky(damping, self.backend, self.block))
            except FactorizationError as exc:
                last = exc
                damping *= self.growth
        raise FactorizationError(
            f"{last} (after {self.max_attempts} attempts, damping up to {damping / self.growth:g})"
        )

    def _first(self) -> DampedCholesky:
        """The first attempt's strategy (at ``damping``)."""
        return DampedCholesky(self.damping, self.backend, self.block)

    @property
    def together(self) -> bool:
        return self._first().together

    def factor_together(self, hs: list[tuple[mx.array, np.ndarray | None]]
                        ) -> list[InverseFactor | FactorizationError]:
        """:meth:`DampedCholesky.factor_together` at ``damping``, then each matrix that failed
        escalates on its own."""
        out = self._first().factor_together(hs)
        return [_outcome(lambda h=h, perm=perm: self.factor_alone(h, perm))
                if isinstance(first, FactorizationError) else first
                for first, (h, perm) in zip(out, hs, strict=True)]

    def factor_many(self, hs: mx.array) -> list[InverseFactor | FactorizationError]:
        out = self._first().factor_many(hs)
        # each that failed from ``damping`` again: as if alone
        return [_outcome(lambda i=i: self.factor(hs[i]))
                if isinstance(first, FactorizationError) else first
                for i, first in enumerate(out)]
