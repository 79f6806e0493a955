"""Quantizers: one weight matrix (plus what its collector gathered) in, quantized values out.

A quantizer is a frozen attrs class whose fields are its options; a recipe rule's extra keys
(``damping = 0.02``) become those fields. Register a subclass with :func:`register_strategy`
and recipes can name it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import RecipeError
from .hessian import HessianCollector, HessianStats
from .inverse import DampedCholesky, EscalatingCholesky, InverseFactor, InverseStrategy
from .kernels.floatfmt import float_pack, float_scales, gptq_quantize_float
from .kernels.gptq import gptq_quantize
from .kernels.gptq_fast import (
    cuda_available,
    cuda_block_ok,
    gptq_quantize_cuda,
    gptq_quantize_numpy,
)
from .kernels.linalg import BACKEND_NAMES
from .kernels.rows import CHUNK_BYTES, map_rows, row_slices, rows_per_chunk
from .kernels.rtn import affine_dequantize, affine_params, affine_quantize
from .kernels.search import search_affine_params
from .specs import QuantSpec

if TYPE_CHECKING:
    import mlx.nn as nn


class CollectorSource(Protocol):
    """What a quantizer needs of a layer handler (:class:`quantkit.registry.LayerHandler`):
    the layer's weight and its default collector. A protocol, so that this module does not
    import the registry (which imports quantizers)."""

    def weight(self, module: nn.Module) -> mx.array: ...

    def collector(self, module: nn.Module) -> HessianCollector: ...


@attrs.frozen
class QuantResult:
    """Quantized values of one weight matrix.

    Affine results carry integer ``codes`` with per-group ``scales``/``biases``; results in MLX's
    float formats carry the arrays MLX stores in ``packed``. ``dequantized`` (float32) is what
    the stored layer computes with; ``info`` holds figures for the run report.
    """

    spec: QuantSpec
    dequantized: mx.array
    codes: mx.array | None = None
    scales: mx.array | None = None
    biases: mx.array | None = None
    packed: dict[str, mx.array] | None = None
    info: dict[str, Any] = attrs.field(factory=dict)


class Quantizer(abc.ABC):
    """Turns one weight matrix into quantized values.

    ``weight`` is float32 with the input dimension last (``(out, in)``, or ``(experts, out, in)``
    for expert layers); ``stats`` is what the layer's collector gathered, ``None`` when
    ``needs_hessian`` is false; ``storage_dtype`` is the dtype scales will be stored in.
    """

    #: The name recipes use for this strategy.
    name: ClassVar[str] = ""
    #: Whether the walker must run calibration data through the layer first.
    needs_hessian: ClassVar[bool] = True
    #: Whether each output row is quantized independently given the statistics, so layers
    #: sharing one Hessian may be solved as one matrix with their rows stacked.
    rows_independent: ClassVar[bool] = False

    #: Whether the collector also needs the full-precision model's inputs of the layer (the
    #: walker then propagates a second, unquantized stream of block inputs).
    needs_reference: ClassVar[bool] = False

    #: Options (attrs fields) a subclass inherits but does not honour: a recipe setting one is
    #: refused at validation (see :func:`strategy_options`), and so is a non-default value
    #: given in Python (:func:`refuse_unsupported`).
    unsupported_options: ClassVar[frozenset[str]] = frozenset()

    def collector(self, handler: CollectorSource, module: nn.Module) -> HessianCollector:
        """The collector that gathers what :meth:`quantize` needs: the layer handler's own by
        default. Override to gather more."""
        return handler.collector(module)

    def factor_strategy(self) -> InverseStrategy | None:
        """The inverse strategy whose factor of ``stats.h`` :meth:`quantize` accepts precomputed
        (``factor=``), so that callers holding many Hessians (the experts of a MoE layer) can
        factorize them together with :meth:`InverseStrategy.factor_many`; ``None`` (the
        default): :meth:`quantize` takes no factor."""
        return None

    def factor_request(self, stats: HessianStats) -> tuple[InverseStrategy, mx.array, np.ndarray | None] | None:
        """What :meth:`quantize` would factorize for ``stats``: the strategy, the Hessian and
        the order its rows and columns are permuted to (``None``: none), so that a caller
        holding several layers' statistics (a decoder block's) can factorize them together
        (:meth:`InverseStrategy.factor_together`) and hand each layer its factor
        (``quantize(..., factor=)``, ``quantize_chunks(..., factor=)``). ``None`` (the
        default): :meth:`quantize` takes no factor."""
        return None

    @abc.abstractmethod
    def quantize(
        self,
        weight: mx.array,
        spec: QuantSpec,
        stats: HessianStats | None,
        storage_dtype: mx.Dtype = mx.float32,
    ) -> QuantResult: ...

    def quantize_chunks(
        self,
        weight: mx.array,
        spec: QuantSpec,
        stats: HessianStats | None,
        storage_dtype: mx.Dtype = mx.float32,
    ) -> Iterator[tuple[slice, QuantResult]]:
        """:meth:`quantize`'s result a slice of output rows at a time, for callers that measure
        and pack each slice and drop it (the walker does, so a 151936-row output head never
        exists in float32 at once). ``weight`` may be in any float dtype here. Default: slices
        of :func:`~quantkit.kernels.rows.rows_per_chunk` rows for ``rows_independent``
        quantizers of 2-D weights (each slice quantized on its own), else one slice."""
        n = weight.shape[0]
        step = rows_per_chunk(n, weight.shape[-1]) if self.rows_independent and weight.ndim == 2 else n
        for rows in row_slices(n, step):
            yield rows, self.quantize(weight[rows].astype(mx.float32), spec, stats, storage_dtype)


def round_to_nearest(weight: mx.array, spec: QuantSpec, storage_dtype: mx.Dtype) -> QuantResult:
    """MLX's own quantization of ``weight``, as a :class:`QuantResult`."""
    if spec.mode != "affine":
        packed = dict(
            zip(
                ("weight", "scales"),
                mx.quantize(weight, group_size=spec.group_size, bits=spec.bits, mode=spec.mode),
            )
        )
        deq = mx.dequantize(
            packed["weight"], packed["scales"], group_size=spec.group_size, bits=spec.bits,
            mode=spec.mode, dtype=mx.float32,
        )
        return QuantResult(spec=spec, dequantized=deq.astype(mx.float32), packed=packed)
    scales, biases = affine_params(weight, spec.bits, spec.group_size)
    return _affine_result(weight, spec, scales, biases, storage_dtype)


def _affine_result(weight, spec, scales, biases, storage_dtype) -> QuantResult:
    scales = scales.astype(storage_dtype).astype(mx.float32)
    biases = biases.astype(storage_dtype).astype(mx.float32)
    codes = affine_quantize(weight, scales, biases, spec.bits)
    return QuantResult(
        spec=spec,
        dequantized=affine_dequantize(codes, scales, biases),
        codes=codes,
        scales=scales,
        biases=biases,
    )


def quantize_by_rows(solve: Callable[[mx.array], QuantResult], weight: mx.array,
                     spec: QuantSpec, budget_mb: float, info: dict[str, Any]) -> QuantResult:
    """``solve(rows of weight)``, a chunk of rows at a time, gathered into one result with
    ``info``: for quantizers whose output rows are independent given the statistics. Chunks
    are sized so that their float32 working set stays under ``budget_mb`` (see
    :mod:`.kernels.rows`); a matrix within it is solved in one piece."""
    n_rows, n_cols = weight.shape
    chunk = rows_per_chunk(n_rows, n_cols, int(budget_mb * 2**20))

    def arrays(rows: slice) -> dict[str, mx.array]:
        r = solve(weight[rows])
        fields = {"dequantized": r.dequantized, "codes": r.codes, "scales": r.scales,
                  "biases": r.biases, "packed": r.packed}
        return {k: v for k, v in tree_flatten(fields) if v is not None}

    out = tree_unflatten(list(map_rows(arrays, n_rows, chunk).items()))
    return QuantResult(spec=spec, info=info, **out)


#: Column-loop implementations of GPTQ with the same arithmetic (``"auto"`` picks one).
COMPUTE_PATHS = ("auto", "mlx", "numpy", "cuda")


def gptq_kernel(compute: str, n_in: int, group_size: int, block_size: int):
    """The GPTQ column-loop function for ``compute`` on this machine.

    ``"auto"``: the CUDA kernel on an NVIDIA GPU (when the widths suit it), NumPy when MLX's
    default device is the CPU (MLX's Linux wheels multiply with reference BLAS), else the MLX
    reference loop (Apple GPUs)."""
    if compute == "auto":
        if cuda_available():
            compute = "cuda" if cuda_block_ok(n_in, group_size, block_size) else "mlx"
        else:
            compute = "numpy" if mx.default_device() == mx.cpu else "mlx"
    return {"mlx": gptq_quantize, "numpy": gptq_quantize_numpy, "cuda": gptq_quantize_cuda}[compute]


#: ``scale_search`` choices: MLX's min/max rule, clipping searched on plain squared error, or on
#: squared error weighted by ``diag(H)`` (see :mod:`quantkit.kernels.search`).
SCALE_SEARCHES = ("none", "mse", "hessian")


def group_params(
    weight: mx.array, spec: QuantSpec, search: str, h_diag: mx.array | None
) -> tuple[mx.array, mx.array]:
    """Affine group scales/biases of ``weight`` by the ``search`` rule (one of SCALE_SEARCHES)."""
    if search == "none":
        return affine_params(weight, spec.bits, spec.group_size)
    return search_affine_params(
        weight, spec.bits, spec.group_size, h_diag if search == "hessian" else None
    )


STRATEGIES: dict[str, type[Quantizer]] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_options_class(cls: type, kind: str, decorator: str) -> None:
    """A one-line :class:`RecipeError` unless ``cls`` is a frozen attrs class (its fields are
    its recipe options; frozen, so instances are hashable configurations)."""
    if not attrs.has(cls):
        raise RecipeError(
            f"{kind} class {_qualname(cls)} is not an attrs class: decorate it with "
            f"@attrs.frozen (below @{decorator}); its fields are its recipe options")
    if getattr(cls.__setattr__, "__name__", "") != "_frozen_setattrs":
        raise RecipeError(
            f"{kind} class {_qualname(cls)} is a mutable attrs class: use @attrs.frozen, not "
            "@attrs.define (configurations are frozen; derive variants with attrs.evolve)")


def register_strategy(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``. A name that is
    already taken by another class is an error, never a silent replacement; so is a class that
    is not ``@attrs.frozen``."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise RecipeError(f"strategy class {_qualname(cls)} has no `name`; set "
                          "name: ClassVar[str] = \"...\" on it")
    taken = STRATEGIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise RecipeError(f"strategy name {cls.name!r} of {_qualname(cls)} is already registered "
                          f"by {_qualname(taken)}; choose another name")
    check_options_class(cls, "strategy", "register_strategy")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_options(name: str) -> tuple[str, ...]:
    """Option names (attrs fields) a registered strategy accepts in a recipe: its fields less
    its ``unsupported_options``."""
    cls = STRATEGIES[name]
    fields = tuple(f.name for f in attrs.fields(cls)) if attrs.has(cls) else ()
    return tuple(f for f in fields if f not in cls.unsupported_options)


def refuse_unsupported(quantizer: Quantizer) -> None:
    """A one-line :class:`RecipeError` when ``quantizer`` has an unsupported option (see
    :attr:`Quantizer.unsupported_options`) set to other than its default."""
    cls = type(quantizer)
    for f in attrs.fields(cls):  # type: ignore[arg-type]  # an attrs subclass
        if f.name in cls.unsupported_options and getattr(quantizer, f.name) != f.default:
            raise RecipeError(
                f"strategy {cls.name!r} does not support option {f.name!r}; "
                f"its options: {list(strategy_options(cls.name))}")


@register_strategy
@attrs.frozen
class RTNQuantizer(Quantizer):
    """Round to nearest. ``scale_search``: ``"none"`` keeps MLX's min/max group scales (no
    calibration needed); ``"mse"`` searches each group's clipping for least squared error;
    ``"hessian"`` weighs that error by ``diag(H)`` (needs calibration). Affine modes only: float
    formats always round with MLX's own scales."""

    name: ClassVar[str] = "rtn"
    rows_independent: ClassVar[bool] = True

    scale_search: str = attrs.field(default="none", validator=attrs.validators.in_(SCALE_SEARCHES))

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.scale_search == "hessian"

    def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
        if self.scale_search == "none" or spec.mode != "affine":
            return round_to_nearest(weight, spec, storage_dtype)
        h_diag = mx.diagonal(stats.h) if self.scale_search == "hessian" else None
        scales, biases = group_params(weight, spec, self.scale_search, h_diag)
        return _affine_result(weight, spec, scales, biases, storage_dtype)


@register_strategy
@attrs.frozen
class GPTQQuantizer(Quantizer):
    """GPTQ: Hessian-aware error feedback, lazy block updates (one ``mx.eval`` per block).

    ``damping``: fraction of the mean Hessian diagonal added before factorizing;
    ``max_attempts``: how many times the damping may grow ×10 when factorization fails
    (1 = plain damped Cholesky); ``linalg``: the Cholesky-inverse backend (``"auto"``: NumPy
    float64 on CPU, blocked matmuls on a GPU; ``"numpy"``, ``"blocked"``, ``"mlx"``,
    ``"numpy-inv"``); ``compute``: the column loop (``"auto"``: one CUDA kernel per block on an
    NVIDIA GPU, NumPy on CPU, else MLX; ``"mlx"`` is the reference loop).

    ``act_order``: process columns in order of decreasing ``diag(H)`` (GPTQ's "act-order"), with
    static groups so the stored layout stays MLX's contiguous groups. ``static_groups``: fix
    every group's scale/bias from the original weights before the loop (implied by
    ``act_order``); otherwise each is chosen from the updated weights when the loop reaches it.
    ``scale_search``: how group scales/biases are chosen (see :class:`RTNQuantizer`).
    ``chunk_mb``: float32 working set, in MB, of one chunk of output rows: a larger layer (an
    output head) is quantized a chunk of rows (at least 8192) at a time, with the same result.

    MLX's float formats (``mxfp4``, ``nvfp4``, ``mxfp8``) get the same error feedback onto their
    grids, with the group scales ``mx.quantize`` picks for the original weights.

    ``quantize(..., factor=)`` takes a precomputed :class:`InverseFactor` of ``stats.h`` (from
    :meth:`factor_strategy`), e.g. one of a batch of experts factorized at once. Not with
    ``act_order``, which factorizes the permuted Hessian: there ``factor_strategy`` is ``None``
    and a ``factor`` is refused.
    """

    name: ClassVar[str] = "gptq"
    rows_independent: ClassVar[bool] = True

    block_size: int = attrs.field(default=128, validator=attrs.validators.gt(0))
    damping: float = attrs.field(default=0.01, validator=attrs.validators.ge(0.0))
    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    linalg: str = attrs.field(default="auto", validator=attrs.validators.in_(BACKEND_NAMES))
    compute: str = attrs.field(default="auto", validator=attrs.validators.in_(COMPUTE_PATHS))
    act_order: bool = False
    static_groups: bool = False
    scale_search: str = attrs.field(default="none", validator=attrs.validators.in_(SCALE_SEARCHES))
    chunk_mb: float = attrs.field(default=CHUNK_BYTES / 2**20, validator=attrs.validators.gt(0))

    def inverse_strategy(self) -> InverseStrategy:
        if self.max_attempts == 1:
            return DampedCholesky(self.damping, self.linalg)
        return EscalatingCholesky(self.damping, max_attempts=self.max_attempts, backend=self.linalg)

    def factor_strategy(self) -> InverseStrategy | None:
        return None if self.act_order else self.inverse_strategy()

    def factor_request(self, stats):
        return self.inverse_strategy(), stats.h, self._order(stats.h)

    def _order(self, h: mx.array) -> np.ndarray | None:
        """The column order of act-order (decreasing ``diag(H)``), ``None`` without it."""
        return np.argsort(-np.asarray(mx.diagonal(h)), kind="stable") if self.act_order else None

    def quantize(self, weight, spec, stats, storage_dtype=mx.float32,
                 factor: InverseFactor | None = None):
        solve, info = self._solver(spec, stats, storage_dtype, factor)
        return quantize_by_rows(solve, weight, spec, self.chunk_mb, info)

    def shared_solver(self, spec, stats, storage_dtype=mx.float32
                      ) -> Callable[[mx.array], QuantResult]:
        """A function quantizing each of several weights that share ``stats`` (layers reading
        the same input) as :meth:`quantize` would, the factorization (of the permuted Hessian
        with ``act_order``) done once, here; raises :class:`FactorizationError` as
        :meth:`quantize` does."""
        solve, info = self._solver(spec, stats, storage_dtype)
        return lambda weight: quantize_by_rows(solve, weight, spec, self.chunk_mb, info)

    def quantize_chunks(self, weight, spec, stats, storage_dtype=mx.float32,
                        factor: InverseFactor | None = None):
        solve, info = self._solver(spec, stats, storage_dtype, factor)
        step = rows_per_chunk(*weight.shape, int(self.chunk_mb * 2**20))
        slices = list(row_slices(weight.shape[0], step))
        for k, rows in enumerate(slices):
            part = solve(weight[rows].astype(mx.float32))
            if k + 1 == len(slices):
                del solve  # and with it the factor: freed while the caller measures the rows
            yield rows, attrs.evolve(part, info=info)
            del part

    def _solver(self, spec, stats, storage_dtype, factor: InverseFactor | None = None
                ) -> tuple[Callable[[mx.array], QuantResult], dict]:
        """The factorization (once per layer; ``factor`` when given) and the function that
        solves rows with it (what subclasses override to change the solve, e.g. GPTAQ)."""
        if factor is not None and self.act_order != (factor.order is not None):
            raise ValueError("act_order factorizes the permuted Hessian: pass the factor "
                             "factor_request describes, or none")
        h, h_diag = stats.h, mx.diagonal(stats.h)
        perm: np.ndarray | None = self._order(h) if factor is None or factor.order is None \
            else np.array(factor.order, dtype=np.int64)
        if factor is None:
            strategy = self.inverse_strategy()
            factor = strategy.factor(h) if perm is None else strategy.factor_permuted(h, perm)
        info = {"damping": factor.damping, "dead_inputs": factor.n_dead}
        return partial(self._solve, spec=spec, u=factor.u, perm=perm, h_diag=h_diag,
                       storage_dtype=storage_dtype), info

    def _solve(self, weight, *, spec, u, perm, h_diag, storage_dtype) -> QuantResult:
        """Rows ``weight`` quantized with the inverse-Hessian factor ``u`` (of the Hessian
        permuted by ``perm`` when acting in order)."""
        inv = group_index = None
        if perm is not None:
            inv = mx.array(np.argsort(perm))
            group_index = (perm // spec.group_size).tolist()
        w = weight if perm is None else weight[:, mx.array(perm)]

        def unpermute(a: mx.array) -> mx.array:
            return a if inv is None else a[:, inv]

        if spec.mode != "affine":
            scales = float_scales(weight, spec.mode, spec.group_size)
            out = gptq_quantize_float(w, u, scales, mode=spec.mode,
                                      block_size=self.block_size, group_index=group_index)
            codes = unpermute(out.codes)
            return QuantResult(
                spec=spec, dequantized=unpermute(out.dequantized),
                packed={"weight": float_pack(codes, spec.mode), "scales": scales},
            )
        kwargs: dict[str, Any] = {}
        if self.act_order or self.static_groups:
            kwargs["scales"], kwargs["biases"] = group_params(weight, spec, self.scale_search, h_diag)
            kwargs["group_index"] = group_index
        elif self.scale_search != "none":
            kwargs["params_fn"] = search_affine_params
            if self.scale_search == "hessian":
                kwargs["importance"] = h_diag
        if any(k in kwargs for k in ("params_fn", "importance")) or group_index is not None:
            kernel = gptq_quantize  # the reference loop takes every option
        else:
            kernel = gptq_kernel(self.compute, w.shape[-1], spec.group_size, self.block_size)
            kwargs.pop("group_index", None)
        out = kernel(
            w,
            u,
            bits=spec.bits,
            group_size=spec.group_size,
            block_size=self.block_size,
            storage_dtype=storage_dtype,
            **kwargs,
        )
        return QuantResult(
            spec=spec,
            dequantized=unpermute(out.dequantized),
            codes=unpermute(out.codes),
            scales=out.scales,
            biases=out.biases,
        )


def hessian_figures(w: mx.array, w_hat: mx.array, h: mx.array, spec: QuantSpec,
                    storage_dtype: mx.Dtype) -> tuple[float, float, float]:
    """``(error of w_hat, output energy, error of round to nearest)`` for ``w (out, in)``, all
    Hessian-weighted: ``trace(D H Dᵀ)`` with ``D = w − w_hat`` (resp. ``w``, ``w − RTN(w)``).

    One float32 product with ``h`` for the three figures, a chunk of rows at a time so the
    temporaries stay within :data:`~quantkit.kernels.rows.CHUNK_BYTES` (an output head's would
    be GBs): NumPy on CPU (CPU builds of MLX have a slow BLAS), MLX on a GPU (no host copies of
    ``h``). The figures are sums of non-negative terms, summed in float64 across chunks."""
    on_cpu = mx.default_device() == mx.cpu
    h32 = np.asarray(h, dtype=np.float32) if on_cpu else h.astype(mx.float32)
    figs = np.zeros(3)
    # Live per chunk: the rows, RTN's temporaries, the differences and their products.
    for rows in row_slices(w.shape[0], rows_per_chunk(*w.shape, copies=12, min_rows=1)):
        w32 = w[rows].astype(mx.float32)
        rtn_hat = round_to_nearest(w[rows], spec, storage_dtype).dequantized
        if on_cpu:
            # trace(D H Dᵀ) = <H, DᵀD>: DᵀD is one symmetric product (half a GEMM's flops).
            # One difference and one n² product at a time.
            for k, diff in enumerate((w32, w32 - w_hat[rows].astype(mx.float32), w32 - rtn_hat)):
                di = np.asarray(diff)
                p = di.T @ di
                p *= h32  # in place (the same products as h32 * p)
                figs[k] += p.sum(dtype=np.float64)
                del di, diff, p
        else:
            diffs = mx.stack([w32, w32 - w_hat[rows].astype(mx.float32), w32 - rtn_hat])
            figs += np.array(mx.sum((diffs @ h32) * diffs, axis=(1, 2)), dtype=np.float64)
    energy, e, rtn = (float(v) for v in figs)
    return e, energy, rtn
