"""NumPy for the calibration's dense arithmetic on CPUs.

MLX's Linux CPU wheel multiplies float32 matrices with netlib reference BLAS (~6 GFLOP/s on
the development machine), NumPy with OpenBLAS (~50–100 GFLOP/s on two cores). A calibration
pass is mostly such products: the linear layers of a block and the ``XᵀX`` of their inputs.
With ``backend="numpy"`` (what ``"auto"`` picks on a CPU device) the walker runs the
``nn.Linear`` layers of the block being calibrated as :class:`HostLinear`, accumulates dense
Hessians in :class:`HostHessianCollector` and computes mlx-lm's attention with NumPy
(:func:`host_attention`); everything else (norms, rotary embeddings, routing, expert layers,
layers not in float32: NumPy has no bfloat16) stays in MLX. Same arithmetic in float32,
different summation order: results agree with the MLX path to float32 rounding (checked in the
tests).

On CPU, MLX and NumPy share host memory: ``np.asarray`` of an evaluated float32 ``mx.array``
is a view, not a copy.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import base

from .hessian import DenseHessianCollector, HessianCollector, HessianStats
from .kernels.attention import attention_numpy
from .registry import Wrapper

BACKENDS = ("auto", "mlx", "numpy")


def resolve_backend(backend: str) -> str:
    """``"auto"``: NumPy on a CPU device, MLX otherwise (layers not in float32 always run in
    MLX: NumPy has no bfloat16)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "numpy" if mx.default_device() == mx.cpu else "mlx"
    return backend


def linear_forward(x: np.ndarray, weight_t: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x (rows, in) @ weight_t (in, out) + bias``, float32."""
    y = x @ weight_t
    if bias is not None:
        y += bias
    return y


class HostLinear(Wrapper):
    """Runs an ``nn.Linear`` with NumPy; other attributes are read from the wrapped layer.
    The NumPy weight is a view of the layer's (evaluated, float32) MLX weight: no copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        w = module.weight.astype(mx.float32)
        mx.eval(w)
        # Plain attributes (not mx.array): not parameters of the model. BLAS reads the
        # transposed view as it is.
        self._weight_t = np.asarray(w).T
        bias = module.get("bias")
        self._bias = None if bias is None else np.asarray(bias.astype(mx.float32)).copy()

    def __call__(self, x: mx.array) -> mx.array:
        rows = np.asarray(x.astype(mx.float32).reshape(-1, x.shape[-1]))
        y = linear_forward(rows, self._weight_t, self._bias)
        return mx.array(y).reshape(*x.shape[:-1], y.shape[-1])


def runs_on_host(module: nn.Module) -> bool:
    """Whether :class:`HostLinear` can stand in for ``module``: a plain float32 ``nn.Linear``."""
    return type(module) is nn.Linear and module.weight.dtype == mx.float32


#: Columns of ``xᵀx`` that :func:`accumulate_hessian` computes at a time: 3 MB of
#: temporaries for a 3072-wide layer instead of its whole 36 MB product.
XTX_COLUMNS = 256


@functools.cache
def _column_slices_exact() -> bool:
    """Whether this BLAS gives ``xᵀx``'s column slices bit for bit as the whole (symmetric)
    product (OpenBLAS does: the same kernel sums each entry in the same order). Checked once on
    a probe; where not, the product is computed whole, so results never depend on this."""
    x = np.random.default_rng(0).standard_normal((300, 2 * XTX_COLUMNS + 40)).astype(np.float32)
    whole = x.T @ x
    return all(np.array_equal(x.T @ x[:, c:c + XTX_COLUMNS], whole[:, c:c + XTX_COLUMNS])
               for c in range(0, x.shape[1], XTX_COLUMNS))


def accumulate_hessian(h: np.ndarray, n_tokens: int, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The running mean ``h`` of ``x xᵀ`` over ``n_tokens`` rows, updated with rows ``x``."""
    m = x.shape[0]
    if m == 0:
        return h, n_tokens
    total = n_tokens + m
    h *= np.float32(n_tokens / total)
    n = h.shape[-1]
    step = XTX_COLUMNS if _column_slices_exact() else n
    for c in range(0, n, step):
        xtx = x.T @ x[:, c:c + step]
        xtx /= np.float32(total)  # in place: no second temporary
        h[:, c:c + step] += xtx
    return h, total


class HostHessianCollector(HessianCollector):
    """:class:`~quantkit.hessian.DenseHessianCollector` computed with NumPy (float32)."""

    def __init__(self, in_features: int) -> None:
        #: NumPy while accumulating; the MLX copy once :meth:`stats` was called.
        self.h: Any = np.zeros((in_features, in_features), dtype=np.float32)
        self.n_tokens = 0

    def update(self, x: mx.array) -> None:
        rows = np.asarray(x.astype(mx.float32).reshape(-1, x.shape[-1]))
        if isinstance(self.h, mx.array):  # updated after stats(): back to a NumPy copy
            self.h = np.array(self.h)
        self.h, self.n_tokens = accumulate_hessian(self.h, self.n_tokens, rows)

    def stats(self) -> HessianStats:
        if self.n_tokens == 0:
            # Lazy zeros (never evaluated: a shard without tokens merges as the identity),
            # not a copy of the NumPy zeros: a tree over more shards than batches holds many.
            return HessianStats(h=mx.zeros(self.h.shape, mx.float32), n_tokens=0)
        if not isinstance(self.h, mx.array):
            self.h = mx.array(self.h)  # the MLX copy replaces the NumPy array (not both held)
        return HessianStats(h=self.h, n_tokens=self.n_tokens)


def host_collector(collector: HessianCollector) -> HessianCollector:
    """The NumPy twin of a plain dense collector; any other collector unchanged."""
    if type(collector) is DenseHessianCollector:
        return HostHessianCollector(collector.h.shape[-1])
    return collector


def _host_sdpa(original, queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` computed by :func:`attention_numpy` when it
    can be (no cache, no attention sinks, float32 operands); else ``original``."""
    mask_ok = mask is None or isinstance(mask, str) and mask == "causal" or (
        isinstance(mask, mx.array) and mask.dtype in (mx.bool_, mx.float32))
    if (cache is not None or sinks is not None or not mask_ok
            or any(a.dtype != mx.float32 for a in (queries, keys, values))):
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    out = attention_numpy(np.asarray(queries), np.asarray(keys), np.asarray(values), scale,
                          np.asarray(mask) if isinstance(mask, mx.array) else mask)
    return mx.array(out)


@contextlib.contextmanager
def host_attention(model: nn.Module) -> Iterator[None]:
    """While active, the mlx-lm modules that define ``model``'s classes and call mlx-lm's
    ``scaled_dot_product_attention`` (its attention layers: llama, qwen, mistral, ... ) compute
    it with :func:`attention_numpy` (see :mod:`quantkit.kernels.attention`). The model code's
    attention is a function call inside the attention layer's ``__call__``, with no module to
    wrap: the name is swapped in those modules and put back on exit, whatever happens."""
    original = base.scaled_dot_product_attention
    modules = {sys.modules.get(type(m).__module__) for _, m in model.named_modules()}
    patched = [m for m in modules
               if m is not None and getattr(m, "scaled_dot_product_attention", None) is original]
    host = partial(_host_sdpa, original)
    for m in patched:
        m.scaled_dot_product_attention = host
    try:
        yield
    finally:
        for m in patched:
            m.scaled_dot_product_attention = original
