"""A block's calibration activations, one array per batch, held in memory or parked on disk.

Between two uses of a batch's activations (its collection pass, the block's last forward pass)
the block's other batches, its Hessians and its solve run: on the CPU (the NumPy backend)
:class:`ParkedActivations` keeps each batch in a scratch file (``TMPDIR``) and hands out a
lazy load of it, so one batch at a time is resident instead of all of them (32×256 tokens at
hidden 1024: 8 MB instead of 32 MB). The bytes read back are the bytes written: results are
the same bit for bit. A plain list is the in-memory variant (what the GPU path uses). Where
``TMPDIR`` is a tmpfs the files stay in memory (outside the process's resident set): point it
at a disk to gain the memory.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableSequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

_FILE_NUMBERS = itertools.count()


class ParkedActivations(MutableSequence):
    """Batches of activations kept in safetensors files under ``directory``: ``acts[j]`` is a
    lazy load of batch ``j`` (read when evaluated; a fresh one each time, so it is freed again
    once its reader is done), ``acts[j] = x`` evaluates ``x``, writes it and drops it."""

    def __init__(self, directory: Path, arrays: Iterable[mx.array] = ()) -> None:
        self._dir = directory
        # Unique across the sequences sharing ``directory``.
        self._names = (f"a{k}.safetensors" for k in _FILE_NUMBERS)
        self._files: list[Path] = []
        for x in arrays:
            self.append(x)

    def _write(self, x: mx.array) -> Path:
        path = self._dir / next(self._names)
        mx.save_safetensors(str(path), {"x": x})
        return path

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[k] for k in range(len(self))[j]]
        return mx.load(str(self._files[j]))["x"]

    def __setitem__(self, j, x) -> None:  # type: ignore[override]
        if isinstance(j, slice):
            raise TypeError("ParkedActivations: assign one batch at a time")
        old, self._files[j] = self._files[j], self._write(x)
        # A lazy load still to be read holds the file open: unlinking it is safe.
        old.unlink(missing_ok=True)

    def __delitem__(self, j) -> None:  # type: ignore[override]
        for path in ([self._files[j]] if not isinstance(j, slice) else self._files[j]):
            path.unlink(missing_ok=True)
        del self._files[j]

    def insert(self, j: int, x: mx.array) -> None:
        self._files.insert(j, self._write(x))


class ParkedLayers(Mapping[str, nn.Module]):
    """Float layers put aside once their quantized layers are made, for the block optimizers
    that read them afterwards (:attr:`~quantkit.blocks.base.BlockContext.float_layers`): each
    layer's weight waits in ``store`` (an activation sequence: scratch files on the host, see
    :class:`ParkedActivations`; a list elsewhere), its module as a shell whose weight is a lazy
    placeholder, never computed. ``layers[path]`` (``path`` without ``prefix``: relative to
    the block) is a copy of the shell holding the weight as ``store`` gives it back (on the
    host a fresh lazy load, the bytes written: what a reader does not keep is not resident)."""

    def __init__(self, store: MutableSequence[mx.array], prefix: str = "") -> None:
        self._store = store
        self._prefix = prefix
        self._shells: dict[str, tuple[nn.Module, int]] = {}

    def park(self, path: str, module: nn.Module) -> nn.Module:
        """Put ``module``'s weight aside (``path``: the layer's path in the model); returns the
        shell to keep instead of ``module`` (its weight: a placeholder of the same shape and
        dtype)."""
        if path.startswith(self._prefix):
            path = path[len(self._prefix):]
        weight = module.weight
        self._store.append(weight)
        shell = copy.copy(module)
        shell.weight = mx.zeros(weight.shape, weight.dtype)
        self._shells[path] = (shell, len(self._store) - 1)
        return shell

    def __getitem__(self, path: str) -> nn.Module:
        shell, k = self._shells[path]
        layer = copy.copy(shell)
        layer.weight = self._store[k]
        return layer

    def __iter__(self) -> Iterator[str]:
        return iter(self._shells)

    def __len__(self) -> int:
        return len(self._shells)

    def close(self) -> None:
        """Drop every parked weight (and its scratch file)."""
        del self._store[:]
        self._shells.clear()


@contextlib.contextmanager
def activation_store(park: bool) -> Iterator[Callable[..., MutableSequence[mx.array]]]:
    """A factory of activation sequences for one run: :class:`ParkedActivations` in a temporary
    directory (removed on exit) when ``park``, else ``list``."""
    if not park:
        yield list
        return
    with tempfile.TemporaryDirectory(prefix="quantkit-acts-") as tmp:
        yield lambda arrays=(): ParkedActivations(Path(tmp), arrays)
