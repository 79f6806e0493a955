"""Quantizers: one weight matrix (plus what its collector gathered) in, quantized values out.

A quantizer is a frozen attrs class whose fields are its options; a recipe rule's extra keys
(``damping = 0.02``) become those fields. Register a subclass with :func:`register_strategy`
and recipes can name it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import mlx.core as mx

from .hessian import HessianCollector, HessianStats
from .inverse import DampedCholesky, EscalatingCholesky, InverseStrategy
from .kernels.gptq import gptq_quantize
from .kernels.rtn import affine_dequantize, affine_params, affine_quantize
from .specs import QuantSpec

if TYPE_CHECKING:
    import mlx.nn as nn

    from .registry import LayerHandler


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
    #: Whether the collector also needs the full-precision model's inputs of the layer (the
    #: walker then propagates a second, unquantized stream of block inputs).
    needs_reference: ClassVar[bool] = False

    def collector(self, handler: LayerHandler, module: nn.Module) -> HessianCollector:
        """The collector that gathers what :meth:`quantize` needs: the layer handler's own by
        default. Override to gather more."""
        return handler.collector(module)

    @abc.abstractmethod
    def quantize(
        self,
        weight: mx.array,
        spec: QuantSpec,
        stats: HessianStats | None,
        storage_dtype: mx.Dtype = mx.float32,
    ) -> QuantResult: ...


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
            mode=spec.mode,
        )
        return QuantResult(spec=spec, dequantized=deq.astype(mx.float32), packed=packed)
    scales, biases = affine_params(weight, spec.bits, spec.group_size)
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


STRATEGIES: dict[str, type[Quantizer]] = {}


def register_strategy(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_options(name: str) -> tuple[str, ...]:
    """Option names (attrs fields) a registered strategy accepts in a recipe."""
    cls = STRATEGIES[name]
    return tuple(f.name for f in attrs.fields(cls)) if attrs.has(cls) else ()


@register_strategy
@attrs.frozen
class RTNQuantizer(Quantizer):
    """Round to nearest with MLX's min/max group scales; needs no calibration."""

    name: ClassVar[str] = "rtn"
    needs_hessian: ClassVar[bool] = False

    def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
        return round_to_nearest(weight, spec, storage_dtype)


@register_strategy
@attrs.frozen
class GPTQQuantizer(Quantizer):
    """GPTQ: Hessian-aware error feedback, lazy block updates (one ``mx.eval`` per block).

    ``damping``: fraction of the mean Hessian diagonal added before factorizing;
    ``max_attempts``: how many times the damping may grow ×10 when factorization fails
    (1 = plain damped Cholesky); ``linalg``: ``"numpy"`` (float64 LAPACK) or ``"mlx"``.
    """

    name: ClassVar[str] = "gptq"

    block_size: int = attrs.field(default=128, validator=attrs.validators.gt(0))
    damping: float = attrs.field(default=0.01, validator=attrs.validators.ge(0.0))
    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    linalg: str = "numpy"

    def inverse_strategy(self) -> InverseStrategy:
        if self.max_attempts == 1:
            return DampedCholesky(self.damping, self.linalg)
        return EscalatingCholesky(self.damping, max_attempts=self.max_attempts, backend=self.linalg)

    def quantize(self, weight, spec, stats, storage_dtype=mx.float32):
        if spec.mode != "affine":
            # Error feedback for MLX's float formats is not implemented here: store RTN.
            result = round_to_nearest(weight, spec, storage_dtype)
            return attrs.evolve(result, info={"note": f"{spec.mode}: round to nearest"})
        factor = self.inverse_strategy().factor(stats.h)
        out = gptq_quantize(
            weight,
            factor.u,
            bits=spec.bits,
            group_size=spec.group_size,
            block_size=self.block_size,
            storage_dtype=storage_dtype,
        )
        return QuantResult(
            spec=spec,
            dequantized=out.dequantized,
            codes=out.codes,
            scales=out.scales,
            biases=out.biases,
            info={"damping": factor.damping, "dead_inputs": factor.n_dead},
        )
