"""Packer round trip against mx.quantize / mx.dequantize at every width and group size.

The reference is MLX's CPU implementation (``stream=mx.cpu``), whatever the default device:
quantkit reproduces its arithmetic bit for bit, and Apple GPUs agree with it. MLX's CUDA
``mx.quantize`` (0.32.4, measured on an H200) is not that reference: for bfloat16 weights it
picks some codes against other roundings and rounds a few scales one bfloat16 ulp apart, and at
1 bit it returns garbage. What a CUDA GPU must do with quantkit's arrays, dequantize them to
quantkit's values, is checked on the default device as well.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from quantkit import AffinePacker, QuantResult, QuantSpec, RTNQuantizer
from quantkit.kernels import (
    affine_dequantize,
    affine_params,
    affine_quantize,
    pack_bits,
    unpack_bits,
)

WIDTHS = [1, 2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_packer_is_bit_exact_with_mx_quantize(bits, group_size, dtype):
    w = (mx.random.normal((24, 384), key=mx.random.key(bits * group_size)) * 0.02).astype(dtype)
    spec = QuantSpec(bits=bits, group_size=group_size)
    w32 = w.astype(mx.float32)
    # mx.quantize picks codes with float32 scales, then stores them in the weight dtype
    s, b = affine_params(w32, bits, group_size)
    codes = affine_quantize(w32, s, b, bits)
    result = QuantResult(spec, affine_dequantize(codes, s, b), codes=codes, scales=s, biases=b)
    packed = AffinePacker().pack(result, dtype)
    ref_w, ref_s, ref_b = mx.quantize(w, group_size=group_size, bits=bits, stream=mx.cpu)
    assert packed["weight"].dtype == mx.uint32 and packed["weight"].shape == ref_w.shape
    assert mx.array_equal(packed["scales"], ref_s)
    assert mx.array_equal(packed["biases"], ref_b)
    assert mx.array_equal(packed["weight"], ref_w)
    arrays = (packed["weight"], packed["scales"], packed["biases"])
    deq = mx.dequantize(*arrays, group_size=group_size, bits=bits, stream=mx.cpu)
    if dtype == mx.float32:
        assert mx.array_equal(deq, result.dequantized)
    # On the default device, the same values: a CUDA GPU may fuse scale·q + bias into one FMA
    # (float32 weights: rounding apart, far less than a quantization step) and, measured on an
    # H200, dequantizes bfloat16 arrays in bfloat16 arithmetic (one bfloat16 ulp of the largest
    # value apart, 4.9e-4 at 4 bits); at 1 bit its kernels return garbage (MLX 0.32.4), so there
    # only the CPU check above applies.
    if mx.default_device() != mx.cpu and bits == 1:
        return
    here = mx.dequantize(*arrays, group_size=group_size, bits=bits, dtype=mx.float32)
    cpu = mx.dequantize(*arrays, group_size=group_size, bits=bits, dtype=mx.float32,
                        stream=mx.cpu)
    step = float(mx.abs(packed["scales"].astype(mx.float32)).min())
    tol = 0.01 * step
    if mx.default_device() != mx.cpu and dtype == mx.bfloat16:
        tol = 2**-6 * float(mx.abs(cpu).max())  # two bfloat16 ulps of the largest value
    assert float(mx.abs(here - cpu).max()) <= tol


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_codes_fit_the_stored_half_precision_scales(bits):
    """quantkit's RTN picks codes against the scales as stored (bfloat16), so it is never
    worse than mx.quantize, which picks them against float32 scales it then rounds."""
    w = (mx.random.normal((64, 256), key=mx.random.key(bits)) * 0.02).astype(mx.bfloat16)
    spec = QuantSpec(bits=bits, group_size=32)
    ours = AffinePacker().pack(RTNQuantizer().quantize(w.astype(mx.float32), spec, None, mx.bfloat16), mx.bfloat16)
    ref = mx.quantize(w, group_size=32, bits=bits, stream=mx.cpu)  # MLX's reference: see above
    assert mx.array_equal(ours["scales"], ref[1]) and mx.array_equal(ours["biases"], ref[2])

    def err(packed):
        deq = mx.dequantize(*packed, group_size=32, bits=bits, stream=mx.cpu).astype(mx.float32)
        return mx.sum((deq - w.astype(mx.float32)) ** 2).item()

    assert err((ours["weight"], ours["scales"], ours["biases"])) <= err(ref)


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_unpack_round_trip(bits):
    codes = mx.random.randint(0, 2**bits, (5, 256), key=mx.random.key(bits)).astype(mx.uint8)
    words = pack_bits(codes, bits)
    assert words.shape == (5, 256 * bits // 32)
    assert mx.array_equal(unpack_bits(words, bits), codes)


def test_expert_weights_pack_like_mlx():
    w = mx.random.normal((4, 16, 128), key=mx.random.key(9))
    spec = QuantSpec(bits=3, group_size=64)
    packed = AffinePacker().pack(RTNQuantizer().quantize(w, spec, None), mx.float32)
    ref_w, ref_s, ref_b = mx.quantize(w, group_size=64, bits=3)
    assert mx.array_equal(packed["weight"], ref_w) and mx.array_equal(packed["scales"], ref_s)
