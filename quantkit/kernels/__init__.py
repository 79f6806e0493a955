"""Pure numerical kernels: arrays and specs in, arrays out. No modules, no I/O, no printing."""

from .floatfmt import FLOAT_FORMATS, float_pack, float_quantize, float_scales, gptq_quantize_float
from .gptq import GPTQOutput, gptq_quantize
from .linalg import inverse_hessian_factor, prepare_hessian, prepare_hessians
from .packing import pack_bits, unpack_bits
from .rtn import affine_dequantize, affine_params, affine_quantize, hessian_error
from .search import search_affine_params

__all__ = [
    "FLOAT_FORMATS",
    "GPTQOutput",
    "affine_dequantize",
    "affine_params",
    "affine_quantize",
    "float_pack",
    "float_quantize",
    "float_scales",
    "gptq_quantize",
    "gptq_quantize_float",
    "hessian_error",
    "inverse_hessian_factor",
    "pack_bits",
    "prepare_hessian",
    "prepare_hessians",
    "search_affine_params",
    "unpack_bits",
]
