"""Packers: quantized values to the arrays a quantized MLX layer holds."""

from __future__ import annotations

import abc

import mlx.core as mx

from .kernels.packing import pack_bits
from .quantizers import QuantResult


class Packer(abc.ABC):
    """Turns a :class:`QuantResult` into ``{"weight", "scales"[, "biases"]}`` arrays laid out as
    ``mx.quantize`` lays them out, scales in ``dtype``."""

    @abc.abstractmethod
    def pack(self, result: QuantResult, dtype: mx.Dtype) -> dict[str, mx.array]: ...


class AffinePacker(Packer):
    """MLX affine layout: codes as a little-endian bit stream in uint32 words, any width."""

    def pack(self, result: QuantResult, dtype: mx.Dtype) -> dict[str, mx.array]:
        if result.codes is None:
            raise ValueError("affine packing needs integer codes")
        return {
            "weight": pack_bits(result.codes, result.spec.bits),
            "scales": result.scales.astype(dtype),
            "biases": result.biases.astype(dtype),
        }


class FloatFormatPacker(Packer):
    """MLX's float formats (``mxfp4``, ``nvfp4``, ``mxfp8``): already packed by the quantizer,
    or quantized here from the dequantized values."""

    def pack(self, result: QuantResult, dtype: mx.Dtype) -> dict[str, mx.array]:
        if result.packed is not None:
            return dict(result.packed)
        spec = result.spec
        w, s = mx.quantize(
            result.dequantized, group_size=spec.group_size, bits=spec.bits, mode=spec.mode
        )
        return {"weight": w, "scales": s}


def packer_for(mode: str) -> Packer:
    return AffinePacker() if mode == "affine" else FloatFormatPacker()
