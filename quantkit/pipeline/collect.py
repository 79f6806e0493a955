"""Collect: run a block's calibration passes with collectors on its layers and return each
layer's statistics (the wrappers these passes install are in :mod:`.calibrate`).

:func:`collect` is one set of passes (one calibration shard); :func:`collect_sharded` runs it
once per shard of this process and merges the shards across processes
(:meth:`~quantkit.distributed.Distributed.reduce_stats`), parking waiting statistics in
scratch files on the host (:func:`parking`). What differs from block to block — the NumPy
runners holding the block's float weights, its :class:`~.calibrate.TailCut`, its row-wise
modules — is a :class:`BlockPasses`, made anew for each block; nothing here keeps state
between calls.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..distributed import Distributed, ShardLayout
from ..hessian import HessianCollector, HessianStats
from ..host import MIN_CHUNK_ROWS, HostHessianCollector, HostLinear, host_collector, runs_on_host
from .calibrate import (
    InputPool,
    RowChunks,
    SharingCollector,
    TailCut,
    paired_passes,
    share_identical,
)
from .plan import LayerPlan

#: Bytes of a row-wise module's widest activation computed at a time during calibration on the
#: host (:func:`row_chunks`): 4 MB, 320 rows of a 3072-wide MLP.
ROW_CHUNK_BYTES = 4 * 2**20


@attrs.define
class Runners:
    """What computes a layer's outputs in a block's collection passes: with ``host``, a
    :class:`HostLinear` (NumPy compute; made once per layer and kept until :meth:`clear`, so it
    holds the layer's float weight), else the layer itself."""

    host: bool = False
    _made: dict[int, tuple[nn.Module, HostLinear]] = attrs.field(factory=dict, repr=False)

    def __call__(self, module: nn.Module) -> nn.Module:
        if not (self.host and runs_on_host(module)):
            return module
        if id(module) not in self._made:
            self._made[id(module)] = (module, HostLinear(module))
        return self._made[id(module)][1]

    def clear(self) -> None:
        """Drop the runners (and the float weights they hold)."""
        self._made.clear()


@attrs.define
class BlockPasses:
    """How one block's calibration passes run; made anew for each block.

    ``host``: collectors gather on the host (:func:`~quantkit.host.host_collector`);
    ``runners``: what computes the layers (:class:`Runners`); ``row_wise``: the paths of the
    block's row-wise modules (see :func:`row_chunks`); ``tail``: the block's
    :class:`~.calibrate.TailCut`, learned over its passes."""

    host: bool = False
    runners: Runners = attrs.field(factory=Runners)
    row_wise: tuple[str, ...] = ()
    tail: TailCut = attrs.field(factory=TailCut)


def collect(model: nn.Module, plans: list[LayerPlan], forward, passes: BlockPasses, reference=None,
            tail_cut: bool = False) -> tuple[dict[str, HessianStats], dict[str, str]]:
    """Install collectors on the layers of ``plans`` that need them and run ``forward()``,
    an iterable of per-batch forward passes. Only the collectors are evaluated, so MLX
    computes no more of each forward than the collected inputs depend on.

    Layers that read the very same input array (q/k/v projections; gate/up) share one
    collector: their Hessian is accumulated once and the same :class:`HessianStats` object
    is returned under each of their paths. Returns ``(stats, owners)``: ``owners[path]`` is
    the path whose collector accumulated ``path``'s inputs.

    ``reference()``, when given, yields the same batches' full-precision forward passes:
    each runs just before its batch's ``forward`` pass, with the collectors of strategies
    that need it set to ``recording`` (they keep the layer inputs it shows them) and the
    other collectors muted.

    ``tail_cut``: ``forward`` runs a decoder block whose outputs are not used (see
    :class:`~quantkit.pipeline.calibrate.TailCut`): each pass may end right after the
    block's last collected input (``passes.tail``)."""
    wanted = [p for p in plans if p.needs_stats]
    if not wanted:
        return {}, {}
    pool = InputPool()
    collectors: dict[str, HessianCollector] = {}
    catchers = []
    # Passes end after the block's last collected input only when every collector is a
    # sharing one (no full-precision reference passes in between).
    tail = passes.tail if tail_cut and not any(p.quantizer.needs_reference for p in wanted) else None
    for p in wanted:
        inner = p.quantizer.collector(p.handler, p.module)
        if p.quantizer.needs_reference:
            collectors[p.path] = inner
        else:
            inner = host_collector(inner) if passes.host else inner
            collectors[p.path] = SharingCollector(p.path, inner, pool, tail)
        catchers.append((p.path, p.handler.catcher(passes.runners(p.module), collectors[p.path])))
    model.update_modules(tree_unflatten(catchers))
    paired = [collectors[p.path] for p in wanted if p.quantizer.needs_reference]
    muted = [c for c in collectors.values() if isinstance(c, SharingCollector)]
    runs = (forward() if reference is None or not paired
            else paired_passes(forward(), reference(), paired, muted))
    try:
        with row_chunks(model, passes.row_wise, pool, collectors):
            for out in runs:
                mx.eval([c.arrays() for c in collectors.values()])
                pool.clear()
                if tail is not None:
                    tail.end_pass()
                del out  # the batch's (unevaluated) output: not held during the next batch
    finally:
        if tail is not None:
            tail.seen, tail.cut = [], False  # a pass stopped by an error is not learned from
        model.update_modules(tree_unflatten([(p.path, p.module) for p in wanted]))
    owners = {k: getattr(c, "owner", None) or k for k, c in collectors.items()}
    owned = {k: c.stats() for k, c in collectors.items() if owners[k] == k}
    return {k: owned[owners[k]] for k in collectors}, owners


def collect_sharded(model: nn.Module, plans: list[LayerPlan], group: Distributed, layout: ShardLayout,
                    run_batch, passes: BlockPasses, run_reference=None,
                    tail_cut: bool = False) -> dict[str, HessianStats]:
    """:func:`collect` once per calibration shard of this rank (``run_batch(j)``: the forward
    pass of local batch ``j``); shard statistics combined across ``group``'s ranks in shard
    order."""
    if not any(p.needs_stats for p in plans):
        return {}
    # On the host, shard statistics waiting in the merge tree go to scratch files (read
    # back, the same bytes, when merged): they do not sit beside the ones being collected.
    with parking(passes.host) as park:
        merged = group.reduce_stats(layout, lambda positions: collect(
            model, plans, lambda: (run_batch(j) for j in positions), passes,
            None if run_reference is None else lambda: (run_reference(j) for j in positions),
            tail_cut=tail_cut,
        )[0], park)
        mx.eval([st.h for st in merged.values() if st.n_tokens > 0])  # before the files go
    return share_identical(merged)


@contextlib.contextmanager
def row_chunks(model: nn.Module, row_wise: tuple[str, ...], pool: InputPool | None = None,
               collectors: dict[str, HessianCollector] | None = None) -> Iterator[None]:
    """While active, the modules at paths ``row_wise`` (an MLP, from the architecture table)
    run :data:`ROW_CHUNK_BYTES` of their widest activation at a time
    (:class:`~quantkit.pipeline.calibrate.RowChunks`): where every layer in them with
    weights runs on the host (:class:`HostLinear`) and, in a collection pass
    (``collectors``), feeds a host collector that gathers whole inputs. Else as they are."""
    current = dict(model.named_modules())
    chunked = []
    for path in row_wise:
        module = current.get(path)
        if module is None:
            continue
        # Every layer with weights in it: a HostLinear's (in a collection pass, under a
        # catcher feeding a host collector; the catcher's path is the layer's).
        weighted = [k for k, m in current.items()
                    if k.startswith(path + ".") and isinstance(m.get("weight"), mx.array)]
        wrapping = 2 if collectors is not None else 1
        layers = [k.rsplit(".", wrapping)[0] for k in weighted]
        ok = bool(weighted) and all(
            k == f"{a}{'.module' * wrapping}"
            and isinstance(current.get(f"{a}.module" if collectors is not None else a), HostLinear)
            and (collectors is None or _host_shared(collectors.get(a)))
            for k, a in zip(weighted, layers))
        if ok:
            width = max(max(current[k]["weight"].shape) for k in weighted)
            rows = ROW_CHUNK_BYTES // (4 * width) // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS
            chunked.append((path, module, RowChunks(module, rows, pool)))
    if chunked:
        model.update_modules(tree_unflatten([(p, w) for p, _, w in chunked]))
    try:
        yield
    finally:
        if chunked:
            model.update_modules(tree_unflatten([(p, m) for p, m, _ in chunked]))


def _host_shared(collector: HessianCollector | None) -> bool:
    """Whether ``collector`` gathers a row-chunked module's whole inputs (see
    :class:`~quantkit.host.HostHessianCollector`)."""
    return isinstance(collector, SharingCollector) and isinstance(collector.inner, HostHessianCollector)


@contextlib.contextmanager
def parking(on: bool) -> Iterator[Callable[[dict[str, HessianStats]], dict[str, HessianStats]] | None]:
    """A ``park`` for :meth:`Distributed.reduce_stats` (``None`` unless ``on``): statistics
    written to a safetensors file in a temporary directory (``TMPDIR``) and replaced by lazy
    loads of it; the directory is removed on exit."""
    if not on:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="quantkit-stats-") as tmp:
        files = (Path(tmp) / f"{k}.safetensors" for k in itertools.count())
        yield lambda stats: park(stats, next(files))


def park(stats: dict[str, HessianStats], path: Path) -> dict[str, HessianStats]:
    """``stats`` with their arrays saved to ``path`` and read back lazily (their memory is
    freed until a merge reads them); entries that are one object stay one object."""
    def arrays_of(st: HessianStats) -> dict[str, mx.array]:
        return {f.name: v for f in attrs.fields(type(st))
                if isinstance(v := getattr(st, f.name), mx.array)}

    names: dict[int, str] = {}
    saved: dict[str, mx.array] = {}
    for st in stats.values():
        if st is not None and st.n_tokens > 0 and id(st) not in names:
            names[id(st)] = f"s{len(names)}"
            saved.update({f"{names[id(st)]}.{k}": v for k, v in arrays_of(st).items()})
    if not saved:
        return stats
    mx.save_safetensors(str(path), saved)
    del saved
    loaded = cast(dict[str, mx.array], mx.load(str(path)))
    # MLX holds the file open until the arrays are read: unlinked now, nothing is left behind
    # should the process be killed (SIGKILL skips the directory's removal).
    with contextlib.suppress(OSError):
        path.unlink()
    parked: dict[int, HessianStats] = {}
    out: dict[str, HessianStats] = {}
    for key, st in stats.items():
        if st is None or id(st) not in names:
            out[key] = st
            continue
        if id(st) not in parked:
            parked[id(st)] = attrs.evolve(st, **{
                k: loaded[f"{names[id(st)]}.{k}"] for k in arrays_of(st)})
        out[key] = parked[id(st)]
    return out


__all__ = ["ROW_CHUNK_BYTES", "BlockPasses", "Runners", "collect", "collect_sharded", "park", "parking",
           "row_chunks"]
