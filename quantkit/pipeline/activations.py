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
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from pathlib import Path

import mlx.core as mx


class ParkedActivations(MutableSequence):
    """Batches of activations kept in safetensors files under ``directory``: ``acts[j]`` is a
    lazy load of batch ``j`` (read when evaluated; a fresh one each time, so it is freed again
    once its reader is done), ``acts[j] = x`` evaluates ``x``, writes it and drops it."""

    def __init__(self, directory: Path, arrays: Iterable[mx.array] = ()) -> None:
        self._dir = directory
        self._names = (f"a{k}.safetensors" for k in itertools.count())
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


@contextlib.contextmanager
def activation_store(park: bool) -> Iterator[Callable[..., MutableSequence[mx.array]]]:
    """A factory of activation sequences for one run: :class:`ParkedActivations` in a temporary
    directory (removed on exit) when ``park``, else ``list``."""
    if not park:
        yield list
        return
    with tempfile.TemporaryDirectory(prefix="quantkit-acts-") as tmp:
        count = itertools.count()

        def parked(arrays: Iterable[mx.array] = ()) -> ParkedActivations:
            # Each sequence in its own folder: two (the quantized and the float model's
            # activations) never share a file name.
            folder = Path(tmp) / f"s{next(count)}"
            folder.mkdir()
            return ParkedActivations(folder, arrays)

        yield parked
