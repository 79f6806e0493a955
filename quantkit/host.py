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

Inside :func:`reusing_buffers` (the walker's calibration passes), the products are written into
work buffers kept by shape and reused batch after batch, instead of a fresh NumPy array each
time (``mx.array(...)`` copies a result into MLX's own buffer cache, so a buffer is free again
as soon as a call returns). A fresh large array costs page faults on first touch, every time
when the C allocator maps it anew: the CLI's fixed mmap threshold (see
``quantkit.cli._return_freed_memory``) does so for every array over 128 KiB. Measured on
benchmarks/job.py's tiny-llama job (32×256 tokens): 1.46 M minor page faults; the results are
bit for bit the same (same BLAS calls, same element-wise operations).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import attrs
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


class _Buffers(threading.local):
    """Per thread: the work buffers by ``(dtype, slot)`` while :func:`reusing_buffers` is
    active (``pool`` is ``None`` otherwise)."""

    pool: dict[tuple, np.ndarray] | None = None


_BUFFERS = _Buffers()


@contextlib.contextmanager
def reusing_buffers() -> Iterator[None]:
    """While active (in this thread), :class:`HostLinear`, :class:`HostHessianCollector` and
    host attention write their products into work buffers reused from one call to the next;
    they are dropped on exit (nested use keeps the outer pool). One buffer per slot, as large
    as the largest request so far, serves every shape (a view of its start): a batch's
    products of different shapes (q/k/v, attention, an MLP's row chunks) hold the largest of
    them between calls, not their sum.

    (MLX's own cache of freed CPU buffers, 32 MB by default, holds two or three of a batch's
    activations; raising it for the passes took the job's page faults down further but
    measured +50 MB of peak resident memory on benchmarks/memory.py's 4-block model: left
    as it is.)"""
    if _BUFFERS.pool is not None:
        yield
        return
    _BUFFERS.pool = {}
    try:
        yield
    finally:
        _BUFFERS.pool = None


def work_buffer(shape: tuple[int, ...], dtype=np.float32, slot: str = "") -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape``: inside :func:`reusing_buffers`, a view
    of the pooled buffer of ``slot`` (its contents are the caller's until the next request of
    the same slot and dtype), else a new one."""
    pool = _BUFFERS.pool
    if pool is None:
        return np.empty(shape, dtype)
    key = (np.dtype(dtype), slot)
    size = int(np.prod(shape))
    buf = pool.get(key)
    if buf is None or buf.size < size:
        pool.pop(key, None)  # the smaller one is freed before the larger is made
        buf = pool[key] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


def linear_forward(x: np.ndarray, weight_t: np.ndarray, bias: np.ndarray | None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``x (rows, in) @ weight_t (in, out) + bias``, float32 (into ``out`` when given)."""
    y = np.matmul(x, weight_t, out=out)
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
        out = work_buffer((rows.shape[0], self._weight_t.shape[1]))
        y = linear_forward(rows, self._weight_t, self._bias, out)
        return mx.array(y).reshape(*x.shape[:-1], y.shape[-1])  # a copy: ``out`` is free again


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


def accumulate_hessian(h: np.ndarray, n_tokens: int, x: np.ndarray,
                       work: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The running mean ``h`` of ``x xᵀ`` over ``n_tokens`` rows, updated with rows ``x``
    (``work``: an array shaped like ``h`` to hold a whole ``xᵀx`` when this BLAS cannot give
    it in column slices, else a new one)."""
    m = x.shape[0]
    if m == 0:
        return h, n_tokens
    total = n_tokens + m
    h *= np.float32(n_tokens / total)
    n = h.shape[-1]
    if not _column_slices_exact():
        xtx = np.matmul(x.T, x, out=work)  # NumPy's symmetric product (syrk), as ``x.T @ x``
        xtx /= np.float32(total)
        h += xtx
        return h, total
    for c in range(0, n, XTX_COLUMNS):
        xtx = x.T @ x[:, c:c + XTX_COLUMNS]
        xtx /= np.float32(total)  # in place: no second temporary
        h[:, c:c + XTX_COLUMNS] += xtx
    return h, total


#: Smallest row chunk of a row-wise module (:func:`row_chunk`): a product of fewer rows may
#: take another BLAS path (one row: a matrix-vector product, not bit for bit the same).
MIN_CHUNK_ROWS = 64


@functools.cache
def row_slices_exact() -> bool:
    """Whether this BLAS gives a matrix product's row slices (of at least
    :data:`MIN_CHUNK_ROWS` rows) bit for bit as the whole product (OpenBLAS does: each entry is
    the same dot product, summed in the same order). Checked once on a probe; where not, no
    module runs in row chunks (:func:`row_chunk`), so results never depend on this."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3 * MIN_CHUNK_ROWS + 37, 300)).astype(np.float32)
    w = rng.standard_normal((300, 2 * XTX_COLUMNS + 40)).astype(np.float32)
    whole = x @ w
    bounds = [0, MIN_CHUNK_ROWS, 2 * MIN_CHUNK_ROWS + 11, x.shape[0]]
    return all(np.array_equal(x[a:b] @ w, whole[a:b]) for a, b in zip(bounds, bounds[1:]))


@attrs.frozen
class RowChunk:
    """Rows ``offset : offset + rows`` of a ``total``-row input that a row-wise module is
    running on (see :func:`row_chunk`)."""

    offset: int
    rows: int
    total: int

    @property
    def last(self) -> bool:
        return self.offset + self.rows == self.total


class _Chunk(threading.local):
    current: RowChunk | None = None


_CHUNK = _Chunk()


@contextlib.contextmanager
def row_chunk(offset: int, rows: int, total: int) -> Iterator[None]:
    """While active (in this thread), a row-wise module (an MLP: each output row depends on its
    own input row only) runs on rows ``offset : offset + rows`` of its ``total``-row input:
    :class:`HostHessianCollector` gathers the chunks' rows and updates its Hessian once with the
    whole input, as an unchunked pass would (the same bytes)."""
    outer, _CHUNK.current = _CHUNK.current, RowChunk(offset, rows, total)
    try:
        yield
    finally:
        _CHUNK.current = outer


def current_row_chunk() -> RowChunk | None:
    """The chunk :func:`row_chunk` set in this thread (``None`` outside one)."""
    return _CHUNK.current


class HostHessianCollector(HessianCollector):
    """:class:`~quantkit.hessian.DenseHessianCollector` computed with NumPy (float32).

    Inside :func:`row_chunk`, the rows of each chunk are copied into a buffer of the whole
    input's rows, and the Hessian is updated with them once the last chunk is in, when the
    pass is over (:meth:`arrays`, called after each batch; or the next :meth:`update` or
    :meth:`stats`): the same product of the same rows as without chunks, computed once the
    pass's activations are freed rather than beside them."""

    def __init__(self, in_features: int) -> None:
        #: NumPy while accumulating; the MLX copy once :meth:`stats` was called.
        self.h: Any = np.zeros((in_features, in_features), dtype=np.float32)
        self.n_tokens = 0
        self._rows: np.ndarray | None = None  # the whole input, gathered chunk by chunk
        self._pending: np.ndarray | None = None  # a whole input gathered, not yet added

    def update(self, x: mx.array) -> None:
        self._flush()
        rows = np.asarray(x.astype(mx.float32).reshape(-1, x.shape[-1]))
        chunk = _CHUNK.current
        if chunk is None:
            self._add(rows)
            return
        if rows.shape[0] != chunk.rows:
            raise RuntimeError(f"a collector in a row chunk of {chunk.rows} rows was given "
                               f"{rows.shape[0]}: the module is not row-wise")
        if chunk.offset == 0:
            self._rows = np.empty((chunk.total, rows.shape[1]), np.float32)
        assert self._rows is not None
        self._rows[chunk.offset:chunk.offset + chunk.rows] = rows
        if chunk.last:
            self._pending, self._rows = self._rows, None

    def _flush(self) -> None:
        if self._pending is not None:
            rows, self._pending = self._pending, None
            self._add(rows)

    def arrays(self) -> list[mx.array]:
        self._flush()  # the batch's pass is over
        return []

    def _add(self, rows: np.ndarray) -> None:
        if isinstance(self.h, mx.array):  # updated after stats(): back to a NumPy copy
            self.h = np.array(self.h)
        # a reused whole-product buffer only where the product is not taken in column slices
        work = None if _column_slices_exact() else work_buffer(self.h.shape, slot="hessian")
        self.h, self.n_tokens = accumulate_hessian(self.h, self.n_tokens, rows, work)

    def stats(self) -> HessianStats:
        self._flush()
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
    q = np.asarray(queries)
    out = work_buffer((*q.shape[:-1], values.shape[-1]))  # free again once copied
    out = attention_numpy(q, np.asarray(keys), np.asarray(values), scale,
                          np.asarray(mask) if isinstance(mask, mx.array) else mask, out=out)
    return mx.array(out)  # a copy: the buffer is free again


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
