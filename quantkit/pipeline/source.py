"""The source model's weight files, read once as a byte stream: a NaN/Inf check tensor by
tensor and (optionally) a sha256 of every file's bytes — without materialising the model.

The model itself is loaded lazily (``mlx_lm``'s ``lazy=True``): its arrays are read from disk
only when a block first uses them. Checking finiteness on those arrays would evaluate — and keep
— every weight; reading the files here keeps one chunk in memory at a time."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

#: Bytes read at a time (a tensor is checked in pieces of at most this size). Small: the scan
#: runs beside the blocks' work (see quantkit.api), so its buffer adds to their peak memory.
CHUNK_BYTES = 2**20

#: safetensors float dtypes NumPy has (checked with ``np.isfinite``, ~4x a bit test).
_NUMPY_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
#: bfloat16, which NumPy lacks: NaN/Inf iff the exponent bits are all ones.
_BF16_EXPONENT = np.uint16(0x7F80)


def _non_finite(chunk: bytes, dtype: str) -> int:
    """How many values of ``chunk`` (raw ``dtype`` data) are NaN or Inf (0 for non-floats)."""
    if dtype in _NUMPY_FLOATS:
        values = np.frombuffer(chunk, dtype=_NUMPY_FLOATS[dtype])
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    if dtype == "BF16":
        bits = np.frombuffer(chunk, dtype=np.uint16)
        return int(np.count_nonzero((bits & _BF16_EXPONENT) == _BF16_EXPONENT))
    return 0


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(f for f in Path(model_dir).glob("*.safetensors") if f.is_file())


def scan_weights(model_dir: str | Path, *, digest: bool = False,
                 workers: int | None = None) -> dict[str, str]:
    """Read every ``*.safetensors`` of ``model_dir`` once. Raises :class:`ModelLoadError` naming
    the first tensor holding NaN/Inf, or a file that is truncated or not safetensors (of the
    first such file in name order). Returns ``{file name: sha256 of its bytes}`` when ``digest``
    (else ``{}``).

    The files of a sharded model are read by ``workers`` threads at once (default: one per core,
    at most one per file): hashing and the NaN/Inf test release the GIL, so a model of many
    shards is scanned several times faster than file after file."""
    files = weight_files(Path(model_dir))
    workers = min(len(files), workers or os.cpu_count() or 1)
    results: list[tuple[str | None, BaseException | None]] = [(None, None)] * len(files)
    if workers <= 1:
        results = [_scan_one(f, digest) for f in files]
    else:
        _on_threads(lambda i: results.__setitem__(i, _scan_one(files[i], digest)), len(files),
                    workers)
    out = {}
    for f, (h, error) in zip(files, results):
        if error is not None:
            raise error
        if h is not None:
            out[f.name] = h
    return out


def _scan_one(f: Path, digest: bool) -> tuple[str | None, BaseException | None]:
    """:func:`_scan_file`'s digest, or the error (returned, so that the first file's wins)."""
    try:
        return _scan_file(f, digest), None
    except OSError as exc:  # unreadable (permissions), a directory named *.safetensors, ...
        why = (exc.strerror or type(exc).__name__).lower()
        return None, ModelLoadError(f"cannot read weight file {f}: {why}; check the file")
    except BaseException as exc:  # a ModelLoadError, or anything else: the caller raises it
        return None, exc


def _on_threads(task: Callable[[int], None], n: int, workers: int) -> None:
    """``task(i)`` for ``i`` in ``range(n)`` on ``workers`` daemon threads (an interrupted
    caller is never held up by them, unlike an executor's threads at exit); returns when all
    are done."""
    items = iter(range(n))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(items, None)
            if i is None:
                return
            task(i)

    threads = [threading.Thread(target=work, daemon=True, name="quantkit-scan-file")
               for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _corrupt(f: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load weights from {f.parent}: {f.name} {why}; the files may be "
                          "truncated or corrupt")


def _scan_file(f: Path, digest: bool) -> str | None:
    h = hashlib.sha256() if digest else None
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _corrupt(f, "has no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise _corrupt(f, "has an impossible header size")
        raw = fh.read(n)
        try:
            header = json.loads(raw)
        except ValueError:
            raise _corrupt(f, "has an unreadable header") from None
        if h is not None:
            h.update(head)
            h.update(raw)
        if not isinstance(header, dict):
            raise _corrupt(f, "has an unreadable header")
        tensors = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                lo, hi = (int(v) for v in info["data_offsets"])
                tensors.append((lo, hi, name, str(info["dtype"])))
            except (KeyError, TypeError, ValueError):
                raise _corrupt(f, f"describes tensor {name} badly") from None
        tensors.sort()
        pos = 0
        body = 8 + n
        for lo, hi, name, dtype in tensors:
            if hi < lo or body + hi > size:
                raise _corrupt(f, f"ends before tensor {name}")
            if lo > pos:  # padding between tensors: only hashed
                _read(fh, lo - pos, h)
                pos = lo
            bad = 0
            remaining = hi - max(lo, pos)
            step = CHUNK_BYTES  # a multiple of every element size
            while remaining > 0:
                chunk = _read(fh, min(step, remaining), h)
                remaining -= len(chunk)
                try:
                    bad += _non_finite(chunk, dtype)
                except ValueError:  # a size that is no multiple of the element size
                    raise _corrupt(f, f"describes tensor {name} badly") from None
            pos = max(pos, hi)
            if bad:
                raise ModelLoadError(
                    f"weight {name} in {f.parent} has {bad} NaN/Inf values; the checkpoint is "
                    "corrupt or was saved after a diverged training step")
        if h is not None:
            while chunk := fh.read(CHUNK_BYTES):
                h.update(chunk)
    return None if h is None else h.hexdigest()


def _read(fh, n: int, h) -> bytes:
    data = fh.read(n)
    if len(data) < n:
        raise _corrupt(Path(fh.name), "is shorter than its header says")
    if h is not None:
        h.update(data)
    return data


class Background:
    """``fn()`` computed on a daemon thread (reading, hashing and NumPy's checks release the
    GIL, so a scan of the weight files overlaps the calibration); :meth:`result` waits for it
    and re-raises its exception, :meth:`error` tells without waiting."""

    def __init__(self, fn: Callable[[], Any], name: str = "quantkit-scan") -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=name)
        self._thread.start()

    def done(self) -> bool:
        """Whether ``fn`` has finished (:meth:`result` would not wait)."""
        return not self._thread.is_alive()

    def error(self) -> BaseException | None:
        """The exception ``fn`` raised, if it has finished with one (never waits)."""
        return None if self._thread.is_alive() else self._error

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
