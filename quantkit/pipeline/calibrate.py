"""Calibration: the pieces that run a block's forward passes and gather its layers' statistics.

Capture: every decoder block is replaced by a :class:`BlockRecorder` while the calibration
batches run, so block 0's inputs (and every block's extra arguments: masks, caches) are
recorded; :class:`StopForward` ends each batch's pass at the last block. Collect: layers
reading the very same input array (q/k/v, gate/up) share one collector
(:class:`InputPool`, :class:`SharingCollector`) and :func:`share_identical` gives them one
statistics object after merging, so they are solved as one matrix. :func:`paired_passes` interleaves
full-precision reference passes (strategies that need them: GPTAQ). :class:`TailCut` ends a
block's later collection passes at its last collected input (:class:`PassEnd`, caught in
:func:`block_forward`). :class:`Replay` stands in for the blocks while the layers outside them
(the output head) are calibrated.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..hessian import HessianCollector, HessianStats
from ..host import MIN_CHUNK_ROWS, current_row_chunk, row_chunk
from ..interrupt import check
from ..registry import Wrapper


class StopForward(Exception):
    pass


class BlockRecorder(Wrapper):
    """Stands in for a decoder block while block inputs are captured: records the arguments the
    model passes (hidden states, masks, caches) and returns the hidden states unchanged."""

    def __init__(self, block: nn.Module, sink: list, last: bool) -> None:
        super().__init__(block)
        self.sink = sink
        self.last = last

    def __call__(self, x, *args, **kwargs):
        self.sink.append((x, args, kwargs))
        if self.last:
            raise StopForward
        return x


class Replay(Wrapper):
    """Stands in for a decoder block while the output head is calibrated: the last block replays
    its stored outputs, earlier blocks pass through."""

    def __init__(self, block: nn.Module, outputs: Sequence[mx.array] | None) -> None:
        super().__init__(block)
        self.outputs = outputs
        self.calls = 0

    def __call__(self, x, *args, **kwargs):
        if self.outputs is None:
            return x
        out = self.outputs[self.calls]
        self.calls += 1
        return out


#: Per batch, a block's extra arguments: ``(args, kwargs)`` (masks, caches).
BlockArgs = list[tuple[tuple, dict]]


def capture(model: nn.Module, blocks: Sequence[nn.Module], block_paths: Sequence[str],
            batches: Sequence[mx.array], before: Callable[[int], None] | None = None,
            ) -> tuple[list[mx.array], list[BlockArgs]]:
    """Block 0's inputs (evaluated) and every block's extra arguments, one entry per batch:
    each block stands aside for a :class:`BlockRecorder` while ``batches`` run through
    ``model`` (``before(b)``: called before batch ``b``)."""
    sinks: list[list] = [[] for _ in blocks]
    model.update_modules(tree_unflatten([
        (p, BlockRecorder(b, s, last=(i == len(blocks) - 1)))
        for i, (p, b, s) in enumerate(zip(block_paths, blocks, sinks))
    ]))
    try:
        for b, batch in enumerate(batches):
            if before is not None:
                before(b)
            try:
                model(batch)
            except StopForward:
                pass
    finally:
        model.update_modules(tree_unflatten(list(zip(block_paths, blocks))))
    inputs = [x for x, _, _ in sinks[0]]
    for x in inputs:
        mx.eval(x)
    return inputs, [[(a, kw) for _, a, kw in s] for s in sinks]


@contextlib.contextmanager
def replaying(model: nn.Module, blocks: Sequence[nn.Module], block_paths: Sequence[str],
              outputs: Sequence[mx.array]) -> Iterator[None]:
    """While active, ``model(batch)`` computes what follows the decoder blocks (final norm,
    head) from the last block's stored ``outputs``, one per call in order (:class:`Replay`);
    the blocks are put back on exit."""
    replays = [Replay(b, None) for b in blocks[:-1]] + [Replay(blocks[-1], outputs)]
    model.update_modules(tree_unflatten(list(zip(block_paths, replays))))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(list(zip(block_paths, blocks))))


def block_forward(block: nn.Module, inputs: list[mx.array], args: list, j: int) -> mx.array | None:
    """Block ``block`` on local batch ``j``: its captured input and extra arguments (``None``
    for a collection pass ended early, see :class:`TailCut`)."""
    check("forward")  # reliab: a place to stop at every calibration batch
    try:
        return block(inputs[j], *args[j][0], **args[j][1])
    except PassEnd:  # the rest of this pass feeds no collector
        return None


def share_identical(stats: dict[str, HessianStats]) -> dict[str, HessianStats]:
    """One object for layers whose statistics are bit for bit the same (layers reading the
    same input: q/k/v, gate/up), so they can be solved jointly. Decided from the merged values,
    the same whatever the number of processes."""
    out: dict[str, HessianStats] = {}
    canonical: list[HessianStats] = []
    for path, st in stats.items():
        for c in canonical:
            if (c.n_tokens == st.n_tokens and c.h.shape == st.h.shape
                    and (c is st or mx.array_equal(c.h, st.h).item())):
                out[path] = c
                break
        else:
            canonical.append(st)
            out[path] = st
    return out


class InputPool:
    """The input arrays seen by collectors during one forward pass, by identity. Held by weak
    reference: an input no layer reads any more is freed during the pass (the attention's
    inputs while the MLP runs), and a new array that takes its ``id`` is not taken for it."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, str]] = {}

    def owner(self, x: mx.array, path: str) -> str:
        """The path of the first collector that saw this very array in this pass (``path``
        itself when none did)."""
        hit = self._seen.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        self._seen[id(x)] = (weakref.ref(x), path)
        return path

    def clear(self) -> None:
        self._seen.clear()

    def mark(self) -> int:
        """A point to :meth:`release` back to."""
        return len(self._seen)

    def release(self, mark: int) -> None:
        """Forget the arrays seen since ``mark`` (a row chunk's: no later layer reads them)."""
        for key in list(self._seen)[mark:]:
            del self._seen[key]


class PassEnd(Exception):
    """Raised by the last collector of a calibration pass (see :class:`TailCut`)."""


class ChunkEnd(Exception):
    """Raised by the last collector of a pass in a row chunk before the last one: the rest of
    that chunk feeds no collector (see :class:`TailCut`, :class:`RowChunks`)."""


class RowChunks(Wrapper):
    """Runs a row-wise module (each output row depends on its own input row only: an MLP) on
    ``rows`` rows of its input at a time, so that its wide intermediate activations (an MLP's
    gate, up and their product) are held for one chunk, not for the whole batch; collectors
    inside gather whole inputs (:func:`quantkit.host.row_chunk`). Each chunk's outputs are
    evaluated before the next; the arrays ``pool`` saw during a chunk are forgotten after it.
    The same bytes as one call on the whole input where every product inside is a BLAS product
    of at least :data:`~quantkit.host.MIN_CHUNK_ROWS` rows (a short last chunk joins the one
    before) and the rest is element-wise."""

    def __init__(self, module: nn.Module, rows: int, pool: InputPool | None = None) -> None:
        super().__init__(module)
        self.rows = max(rows, MIN_CHUNK_ROWS)
        self.pool = pool

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1])
        total = flat.shape[0]
        starts = list(range(0, total, self.rows))
        if len(starts) > 1 and total - starts[-1] < MIN_CHUNK_ROWS:
            starts.pop()
        if len(starts) == 1:
            return self.module(x)
        outs = []
        for a, b in zip(starts, starts[1:] + [total]):
            mark = self.pool.mark() if self.pool is not None else 0
            try:
                with row_chunk(a, b - a, total):
                    y = self.module(flat[a:b])
                mx.eval(y)
                outs.append(y)
            except ChunkEnd:  # the last chunk ends the pass (PassEnd)
                pass
            finally:
                if self.pool is not None:
                    self.pool.release(mark)
        if len(outs) < len(starts):
            raise RuntimeError("a pass cut in a row chunk went on after the last chunk")
        return mx.concatenate(outs).reshape(*x.shape[:-1], -1)


class TailCut:
    """Ends a decoder block's calibration passes after the last layer input they collect.

    A collection pass only feeds collectors; the block's output is dropped. What the block
    computes after its last collected input — that layer's own product (the down projection
    of an MLP) and what follows it — feeds nothing, yet the NumPy backend computes it eagerly
    (MLX, lazy, would skip it). The first whole pass of a block records the order in which
    its collectors are called; a later pass that has called them in the very same order up to
    the last one stops there (:class:`PassEnd`, caught in :func:`block_forward`), after that
    collector took its input and before the layer runs. A pass that calls them otherwise
    (control flow that depends on the data) turns the cut off for the rest of the block, so
    every collector sees exactly the inputs of a whole pass."""

    def __init__(self) -> None:
        self.order: list[str] | None = None  # the collectors a whole pass called, in order
        self.seen: list[str] = []
        self.cut = False
        self.enabled = True
        self._chunk: object = None  # the row chunk before the last one being run, and
        self._in_chunk: list[str] = []  # the collectors called in it

    def called(self, path: str) -> None:
        """Collector ``path`` has taken its input: end the pass if it is the last one. In a
        row chunk (:class:`RowChunks`) the call counts at the module's last chunk; at an earlier
        chunk, the last collector ends that chunk (:class:`ChunkEnd`)."""
        chunk = current_row_chunk()
        if chunk is not None and not chunk.last:
            if chunk is not self._chunk:
                self._chunk, self._in_chunk = chunk, []
            self._in_chunk.append(path)
            if (self.order is not None and self.enabled
                    and self.seen + self._in_chunk == self.order):
                raise ChunkEnd
            return
        self.seen.append(path)
        if self.order is None or not self.enabled:
            return
        k = len(self.seen) - 1
        if k >= len(self.order) or self.order[k] != path:
            self.enabled = False
        elif k == len(self.order) - 1:
            self.cut = True
            raise PassEnd

    def end_pass(self) -> None:
        """A pass is over: learn the order from the first whole one."""
        if self.seen and not self.cut:
            if self.order is None:
                self.order = self.seen
            elif self.seen != self.order:
                self.enabled = False
        self.seen, self.cut = [], False


class SharingCollector(HessianCollector):
    """Feeds ``inner`` only with inputs no other collector of the pool saw first; a layer whose
    inputs are always another layer's (``owner``) gets that layer's statistics. ``tail``: the
    block's :class:`TailCut`, told of every call."""

    def __init__(self, path: str, inner: HessianCollector, pool: InputPool,
                 tail: TailCut | None = None) -> None:
        self.path = path
        self.inner = inner
        self.pool = pool
        self.tail = tail
        self.owner: str | None = None  # None until the first input; then the path that owns them
        self.muted = False  # set while a full-precision reference pass runs (GPTAQ)

    def update(self, x: mx.array) -> None:
        if self.muted:
            return
        owner = self.pool.owner(x, self.path)
        if self.owner is None:
            self.owner = owner
        elif owner != self.owner:
            raise RuntimeError(
                f"{self.path}: inputs shared with {self.owner} in one pass but not in another"
            )
        if owner == self.path:
            self.inner.update(x)
        if self.tail is not None:
            self.tail.called(self.path)

    def stats(self) -> HessianStats:
        return self.inner.stats()

    def arrays(self) -> list[mx.array]:
        return self.inner.arrays() if self.owner in (None, self.path) else []


def paired_passes(passes, references, collectors, muted=()):
    """Each reference pass (``collectors`` recording, ``muted`` ignoring their inputs) followed
    by its batch's pass."""
    passes, references = iter(passes), iter(references)
    while True:
        for c in collectors:
            c.recording = True
        for c in muted:
            c.muted = True
        try:
            done = next(references, None) is None
        finally:
            for c in collectors:
                c.recording = False
            for c in muted:
                c.muted = False
        if done:
            return
        yield next(passes)
