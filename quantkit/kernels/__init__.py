"""Pure numerical kernels: arrays and specs in, arrays out. No modules, no I/O, no printing."""

from .gptq import GPTQOutput, gptq_quantize
from .linalg import inverse_hessian_factor, prepare_hessian
from .packing import pack_bits, unpack_bits
from .rtn import affine_dequantize, affine_params, affine_quantize, hessian_error

__all__ = [
    "GPTQOutput",
    "affine_dequantize",
    "affine_params",
    "affine_quantize",
    "gptq_quantize",
    "hessian_error",
    "inverse_hessian_factor",
    "pack_bits",
    "prepare_hessian",
    "unpack_bits",
]
