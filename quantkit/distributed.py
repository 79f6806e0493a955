"""Quantize across processes and hosts with MLX's own distributed engine (``mx.distributed``).

A :class:`Distributed` object is the walker's only view of the process group. It answers three
questions, each a hook the walker calls:

* which calibration batches this rank runs (:meth:`Distributed.layout`): the batches are cut
  into a fixed number of *shards* (``num_shards``, whatever the world size); rank ``r`` owns a
  contiguous range of shards and computes block inputs for its own batches only;
* how partial statistics are combined (:meth:`Distributed.reduce_stats`): each shard's
  statistics are merged along a fixed binary tree over the shards. A rank merges the whole
  subtrees it owns locally, the roots are exchanged with ``all_gather`` and every rank finishes
  the same tree. The floating-point operations are the same for any world size, so 1, 2 or 4
  processes produce byte-identical Hessians — and so byte-identical output;
* which rank does which unit of work (:meth:`Distributed.share`, given the units' estimated
  costs: the walker's layers, :mod:`quantkit.pipeline.expert_layers`'s experts) and how the results reach everyone
  (:meth:`Distributed.exchange`: JSON-able metadata with named arrays, sent to every rank with
  ``all_gather``, padded to equal sizes: the ring backend has no point-to-point transfer
  except between neighbours). Every rank then installs the full quantized block.

This module knows nothing about quantization: costs and items are handed to it.

With no launcher ``mx.distributed.init()`` gives a group of size 1 and the same code runs with
no communication. Collectives run at ``mx.eval``; every rank issues them in the same order.
A collective that fails (a peer died) raises :class:`DistributedError`; one that does not
finish within ``timeout_s`` calls ``on_timeout`` from a watchdog thread (the CLI ends the
process there: a blocked collective cannot be interrupted from Python). Connecting holds the
GIL, so no thread can watch it: :func:`connect_to_other_ranks` interrupts it with ``SIGALRM``
instead and says in one line what went wrong.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from .errors import DistributedError
from .hessian import HessianStats

#: ``(level, index)`` of a node in the binary tree over shards; leaves are level 0.
Node = tuple[int, int]
Stats = dict[str, HessianStats]
#: One unit of exchanged work: JSON-able metadata and named arrays.
Item = tuple[dict[str, Any], list[tuple[str, mx.array]]]


@attrs.frozen
class ShardLayout:
    """Which batches make up each shard and which rank owns each shard.

    ``shards[s]``: the global batch indices of shard ``s`` (contiguous, in order);
    ``ranges[r]``: the shards ``[start, stop)`` of rank ``r``."""

    shards: tuple[tuple[int, ...], ...]
    ranges: tuple[tuple[int, int], ...]
    rank: int

    @classmethod
    def build(cls, n_batches: int, num_shards: int, size: int, rank: int) -> ShardLayout:
        if size > num_shards:
            raise DistributedError(
                f"{size} processes but only {num_shards} calibration shards; use at most "
                f"{num_shards} processes or more shards (--shards)"
            )
        shards = tuple(
            tuple(range(s * n_batches // num_shards, (s + 1) * n_batches // num_shards))
            for s in range(num_shards)
        )
        ranges = tuple((r * num_shards // size, (r + 1) * num_shards // size) for r in range(size))
        return cls(shards, ranges, rank)

    @property
    def local_batches(self) -> list[int]:
        """Global indices of this rank's batches, in shard order."""
        start, stop = self.ranges[self.rank]
        return [b for s in range(start, stop) for b in self.shards[s]]

    def local_shards(self) -> Iterator[tuple[int, list[int]]]:
        """``(shard, positions in local_batches)`` for each shard of this rank."""
        start, stop = self.ranges[self.rank]
        pos = 0
        for s in range(start, stop):
            n = len(self.shards[s])
            yield s, list(range(pos, pos + n))
            pos += n

    @property
    def depth(self) -> int:
        return max(len(self.shards) - 1, 0).bit_length()

    def roots(self, rank: int) -> list[Node]:
        """The maximal aligned subtrees covering rank ``rank``'s shards, left to right."""
        start, stop = self.ranges[rank]
        nodes: list[Node] = []
        while start < stop:
            level = 0
            while start % (2 << level) == 0 and start + (2 << level) <= stop:
                level += 1
            nodes.append((level, start >> level))
            start += 1 << level
        return nodes


def merge_stats(a: HessianStats | None, b: HessianStats | None) -> HessianStats | None:
    """Statistics of the union of two disjoint token sets; ``None`` (or no tokens) is the
    identity, exactly. Means are combined weighted by token counts."""
    if a is None or a.n_tokens == 0:
        return b if b is not None else a
    if b is None or b.n_tokens == 0:
        return a
    total = a.n_tokens + b.n_tokens
    wa, wb = a.n_tokens / total, b.n_tokens / total

    def mean(x: mx.array | None, y: mx.array | None) -> mx.array | None:
        if x is None and y is None:
            return None  # e.g. GPTAQ's asymmetry term when no reference inputs were seen
        x = mx.zeros_like(y) if x is None else x
        y = mx.zeros_like(x) if y is None else y
        return x * wa + y * wb

    # Subclasses (per-strategy statistics) keep their extra per-token means.
    extra = {f.name: mean(getattr(a, f.name), getattr(b, f.name))
             for f in attrs.fields(type(a)) if f.name not in ("h", "n_tokens")
             and isinstance(getattr(a, f.name, None) if getattr(a, f.name, None) is not None
                            else getattr(b, f.name, None), mx.array)}
    return attrs.evolve(a, h=a.h * wa + b.h * wb, n_tokens=total, **extra)


def _merge_dicts(a: Stats | None, b: Stats | None) -> Stats | None:
    """Merge two subtrees' statistics, consuming them: entry by entry, each merge evaluated
    and its inputs released before the next, so a merge holds one layer's temporaries on top
    of its inputs (not every layer's). Entries that are one object in both (layers reading the
    same input) are merged once and stay one object."""
    if a is None:
        return b
    if b is None:
        return a
    out: Stats = {}
    done: dict[tuple[int, int], Any] = {}
    for k in list(a):
        x, y = a.pop(k), b.pop(k)
        key = (id(x), id(y))
        if key not in done:
            merged = merge_stats(x, y)
            fresh = merged is not None and merged is not x and merged is not y
            # Only the merge's graph holds the inputs now (unless other keys share them): MLX
            # frees them, or computes in their buffers, as it goes.
            del x, y
            if fresh and merged is not None:
                mx.eval(merged.h)
            done[key] = merged
        else:
            del x, y
        out[k] = done[key]
    return out


def connect_to_other_ranks(backend: str = "any", strict: bool = False,
                           timeout_s: float | None = None) -> Any:
    """``mx.distributed.init``: blocks, holding the GIL, until every peer has connected.

    With ``timeout_s`` (and on the main thread) the wait is bounded: ``SIGALRM`` interrupts the
    blocked ``accept``/``connect`` (then every second, in case it lands between two calls), and
    the previous handler is put back afterwards. A failure raises :class:`DistributedError` with
    one line naming the problem and the fix (hostfile, port, peer not started)."""
    armed = timeout_s is not None and threading.current_thread() is threading.main_thread() \
        and hasattr(signal, "setitimer")
    fired: list[bool] = []
    previous = None
    if armed:
        previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(True))
        signal.setitimer(signal.ITIMER_REAL, max(float(timeout_s), 1e-3), 1.0)
    try:
        return mx.distributed.init(strict=strict, backend=backend)
    except RuntimeError as exc:
        raise DistributedError(_connect_failure(str(exc), bool(fired), timeout_s)) from None
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _connect_failure(message: str, timed_out: bool, timeout_s: float | None) -> str:
    """One line for a failed ``mx.distributed.init``: what went wrong and what to do, naming
    this rank's and its neighbour's addresses from the ring hostfile when there is one."""
    rank, hostfile = os.environ.get("MLX_RANK"), os.environ.get("MLX_HOSTFILE")
    hosts: Any = []
    with contextlib.suppress(OSError, ValueError, TypeError):
        hosts = json.loads(Path(hostfile).read_text()) if hostfile else []
    r = int(rank) if rank is not None and rank.isdigit() else None
    if r is None or not hostfile or not isinstance(hosts, list) or not 0 <= r < len(hosts):
        return f"cannot start the distributed group: {message}"
    n = len(hosts)

    def addr(k: int) -> str:
        h = hosts[k % n]
        return ", ".join(h) if isinstance(h, list) else str(h)

    code = re.search(r"error: (\d+)", message)
    err = int(code.group(1)) if code else None
    where = f"rank {r} of {n} (hostfile {hostfile})"
    if "bind" in message and err == errno.EADDRINUSE:
        return (f"{where}: cannot listen on {addr(r)}: the address is in use (an earlier run "
                f"still alive, or another program); stop it or give this rank another port "
                f"in the hostfile")
    if "bind" in message and err == errno.EADDRNOTAVAIL:
        return (f"{where}: cannot listen on {addr(r)}: not an address of this machine; put "
                f"this machine's own address for rank {r} in the hostfile")
    if "couldn't connect" in message.lower():  # after MLX's own retries (about 30 s)
        why = f" ({os.strerror(err).lower()})" if err not in (None, errno.EINTR) else ""
        return (f"{where}: could not connect to rank {(r + 1) % n} at {addr(r + 1)}{why}; "
                f"that rank is not started or listens elsewhere: start every rank with the "
                f"same hostfile, within 30 s of each other")
    if timed_out:
        return (f"{where}: the other ranks did not connect within {timeout_s:g} s (this rank "
                f"listens on {addr(r)}, connects to rank {(r + 1) % n} at {addr(r + 1)}); start "
                f"every rank of the hostfile with the same hostfile, check that these "
                f"addresses are reachable (firewall), or raise --timeout")
    return f"{where}: cannot start the distributed group: {message}"


def local_roots(layout: ShardLayout, collect: Callable[[list[int]], Stats],
                park: Callable[[Stats], Stats] | None = None) -> dict[Node, Stats]:
    """This rank's shards merged into the maximal subtrees it owns (``layout.roots``), one
    shard at a time: at most ``log2(num_shards) + 1`` partial statistics are alive at once.

    ``park(stats)``, when given, is applied to each partial result that must wait for a later
    shard and returns the same values held elsewhere (e.g. lazy loads of a file): the
    statistics being collected do not sit beside up to ``log2(num_shards)`` waiting ones."""
    stack: list[tuple[Node, Stats]] = []
    shards = list(layout.local_shards())
    for k, (shard, positions) in enumerate(shards):
        node, stats = (0, shard), collect(positions)
        while stack and node[1] % 2 == 1 and stack[-1][0] == (node[0], node[1] - 1):
            stats = _merge_dicts(stack.pop()[1], stats)
            node = (node[0] + 1, node[1] // 2)
            # Statistics without tokens stay unevaluated (lazy zeros): their merges are the
            # identity, and a tree over more shards than batches holds many of them.
            mx.eval([s.h for s in stats.values() if s is not None and s.n_tokens > 0])
        if park is not None and k + 1 < len(shards) and stats:
            stats = park(stats)
        stack.append((node, stats))
    return dict(stack)


def _tree_node(known: dict[Node, Stats], level: int, index: int) -> Stats | None:
    """Node ``(level, index)`` of the shard tree, merged from the subtree roots in ``known``.

    A module-level function, not a closure calling itself: such a closure is a reference cycle
    holding ``known`` (a block's Hessians) until Python's cyclic collector happens to run."""
    if (level, index) in known:
        return known[level, index]
    if level == 0:
        return None  # a padding leaf beyond the last shard
    return _merge_dicts(_tree_node(known, level - 1, 2 * index),
                        _tree_node(known, level - 1, 2 * index + 1))


def finish_tree(known: dict[Node, Stats], depth: int) -> Stats:
    """The root of the shard tree from the subtree roots in ``known`` (every rank's)."""
    root = _tree_node(known, depth, 0) or {}
    mx.eval([s.h for s in root.values() if s is not None and s.n_tokens > 0])
    return root


@attrs.frozen
class Distributed:
    """The process group and the settings of a distributed run.

    ``group``: an ``mx.distributed.Group`` (``None``: this process alone); ``num_shards``:
    calibration shards (results depend on it, never on the world size); ``chunk_bytes``: the
    most one ``all_gather`` carries per rank (statistics and quantized layers travel in
    slices); ``timeout_s``/``on_timeout``: a watchdog around every collective, called with a
    description of what was being waited for.
    """

    group: Any = None
    num_shards: int = attrs.field(default=8, validator=attrs.validators.gt(0))
    chunk_bytes: int = attrs.field(default=256 << 20, validator=attrs.validators.gt(0))
    timeout_s: float | None = None
    on_timeout: Callable[[str], None] | None = None

    @classmethod
    def init(cls, backend: str = "any", strict: bool = False, **settings: Any) -> Distributed:
        """Join the group a launcher set up (``mlx.launch``, or ``MLX_RANK``/``MLX_HOSTFILE``);
        with no launcher this is a group of size 1. Connecting waits for every peer, at most
        ``timeout_s`` (see :func:`connect_to_other_ranks`); a failure raises
        :class:`DistributedError`."""
        group = connect_to_other_ranks(backend, strict, settings.get("timeout_s"))
        return cls(group, **settings)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    @property
    def size(self) -> int:
        return 1 if self.group is None else self.group.size()

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _watch(self, what: str) -> Iterator[None]:
        timer = None
        if self.timeout_s is not None and self.on_timeout is not None:
            message = f"rank {self.rank}: no progress for {self.timeout_s:g} s while {what}"
            timer = threading.Timer(self.timeout_s, self.on_timeout, args=(message,))
            timer.daemon = True
            timer.start()
        try:
            yield
        except RuntimeError as exc:  # only collectives run here
            raise DistributedError(
                f"rank {self.rank} lost another rank while {what} ({exc}); "
                "a process died or the network failed"
            ) from None
        finally:
            if timer is not None:
                timer.cancel()

    def _gather(self, x: mx.array, what: str) -> mx.array:
        """``(size, *x.shape)``: every rank's ``x``, evaluated."""
        if self.size == 1:
            return x[None]
        with self._watch(what):
            y = mx.distributed.all_gather(x[None], group=self.group)
            mx.eval(y)
        return y

    def sum(self, x: mx.array, what: str = "summing a block method's figures") -> mx.array:
        """``x`` summed over every rank, in rank order (the same bytes on every rank)."""
        if self.size == 1:
            return x
        return self._gather(x, what).sum(axis=0)

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (a failed rank raises :class:`DistributedError`)."""
        if self.size > 1:
            with self._watch(what):
                mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    # -- data parallel calibration ----------------------------------------------------------

    def layout(self, n_batches: int) -> ShardLayout:
        return ShardLayout.build(n_batches, self.num_shards, self.size, self.rank)

    def reduce_stats(self, layout: ShardLayout, collect: Callable[[list[int]], Stats],
                     park: Callable[[Stats], Stats] | None = None) -> Stats:
        """Statistics of all calibration batches, the same bytes on every rank and for every
        world size. ``collect(positions)`` gathers one shard's statistics from this rank's
        batches at ``positions``; it is called once per local shard, in shard order.
        ``park``: see :func:`local_roots`."""
        known = local_roots(layout, collect, park)
        if not next(iter(known.values())):
            return {}  # nothing to collect in this block (the same on every rank)
        if self.size > 1:
            return self._combine_across_ranks(layout, known)
        return finish_tree(known, layout.depth)

    def _combine_across_ranks(self, layout: ShardLayout, mine: dict[Node, Stats]) -> Stats:
        """Finish the shard tree from every rank's subtree roots, one layer and one slice of
        its statistics at a time: the merge is elementwise, so slicing changes no bytes, and
        at most ``size`` slices of ``chunk_bytes`` plus the result are held on top of
        this rank's own roots."""
        roots = [layout.roots(r) for r in range(self.size)]
        own = roots[self.rank]
        rounds = max(len(r) for r in roots)
        out: Stats = {}
        for path, ref in mine[own[0]].items():
            what = f"combining statistics of {path}"
            counts: dict[Node, int] = {}
            for k in range(rounds):
                n = mine[own[k]][path].n_tokens if k < len(own) else 0
                got = self._gather(mx.array([n], dtype=mx.int64), what).reshape(-1).tolist()
                counts.update({roots[r][k]: got[r] for r in range(self.size) if k < len(roots[r])})
            flat_size = ref.h.size
            step = max(self.chunk_bytes // ref.h.dtype.size, 1)
            pieces = []
            for a in range(0, flat_size, step):
                b = min(a + step, flat_size)
                known: dict[Node, Stats] = {}
                for k in range(rounds):
                    h = (mine[own[k]][path].h.reshape(-1)[a:b] if k < len(own)
                         else mx.zeros((b - a,), ref.h.dtype))
                    got = self._gather(h, what)
                    for r in range(self.size):
                        if k < len(roots[r]):
                            node = roots[r][k]
                            known[node] = {path: HessianStats(h=got[r], n_tokens=counts[node])}
                pieces.append(finish_tree(known, layout.depth)[path])
            out[path] = HessianStats(
                h=mx.concatenate([p.h for p in pieces]).reshape(ref.h.shape),
                n_tokens=pieces[0].n_tokens,
            )
            mx.eval(out[path].h)
        return out

    # -- work-parallel quantization ---------------------------------------------------------

    def share(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each unit of work of estimated ``costs``: largest first to the
        least loaded rank (ties keep the given order and go to the lowest rank). Depends only
        on ``costs``, so every rank computes the same answer."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # stable
            r = min(range(self.size), key=lambda r: load[r])
            owner[i] = r
            load[r] += costs[i]
        return owner

    def exchange(self, items: list[Item], what: str) -> list[list[Item]]:
        """Every rank's ``items`` (JSON-able metadata with named arrays), indexed by rank; this
        rank's own are returned as given. One ``all_gather`` of the payload sizes, then the
        payloads in slices of at most ``chunk_bytes``, padded to the longest."""
        if self.size == 1:
            return [items]
        payload = _encode(items)
        lengths = self._gather(mx.array([payload.size], dtype=mx.int64), what).reshape(-1).tolist()
        parts: list[list[mx.array]] = [[] for _ in range(self.size)]
        for start in range(0, max(lengths), self.chunk_bytes):
            width = min(self.chunk_bytes, max(lengths) - start)
            piece = payload[start : start + width]
            if piece.size < width:
                piece = mx.concatenate([piece, mx.zeros((width - piece.size,), mx.uint8)])
            got = self._gather(piece, what)
            for r in range(self.size):
                if start < lengths[r]:
                    parts[r].append(got[r, : lengths[r] - start])
        return [items if r == self.rank else list(_decode(mx.concatenate(parts[r])))
                for r in range(self.size)]


def _encode(items: list[Item]) -> mx.array:
    """One uint8 array: a JSON header (each item's metadata, array names/dtypes/shapes), then
    the raw bytes of every array."""
    header: list[dict[str, Any]] = []
    blobs: list[mx.array] = []
    for meta, arrays in items:
        names = []
        for name, value in arrays:
            names.append([name, str(value.dtype).rsplit(".", 1)[-1], list(value.shape)])
            blobs.append(mx.contiguous(value).reshape(-1).view(mx.uint8))
        header.append({"meta": meta, "arrays": names})
    head = json.dumps(header).encode()
    prefix = mx.array(list(len(head).to_bytes(8, "little")) + list(head), dtype=mx.uint8)
    return mx.concatenate([prefix, *blobs]) if blobs else prefix


def _decode(buf: mx.array) -> Iterator[Item]:
    n = int.from_bytes(bytes(buf[:8].tolist()), "little")
    header = json.loads(bytes(buf[8 : 8 + n].tolist()).decode())
    pos = 8 + n
    for item in header:
        arrays = []
        for name, dtype, shape in item["arrays"]:
            dt = getattr(mx, dtype)
            nbytes = dt.size
            for d in shape:
                nbytes *= d
            arrays.append((name, buf[pos : pos + nbytes].view(dt).reshape(shape)))
            pos += nbytes
        yield item["meta"], arrays
