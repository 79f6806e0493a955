"""Resumable runs: the walker's state after each finished decoder block.

After block ``i`` the walker hands a :class:`Checkpoint` the quantized parameters of that block's
layers, their report records and the inputs of block ``i + 1`` (what the quantized block
produced). :meth:`Checkpoint.load` gives back everything up to the last finished block, so a new
process continues from there and ends with exactly the arrays an uninterrupted run produces.

:class:`DirectoryCheckpoint` keeps this in a hidden sibling of the output directory,
``.NAME.checkpoint/``::

    meta.json                 format version + fingerprint of the run (model, tokens, recipe...)
    block-0003.safetensors    quantized parameters of block 3's layers, keyed by parameter path
    block-0003.json           report records of block 3's layers
    inputs-0003.safetensors   inputs of block 4, one array per calibration batch
    progress.json             {"next_block": 4, "inputs": "inputs-0003.safetensors"}
    lock                      held (flock) by the run using the checkpoint

Every file is written under a temporary name and renamed into place; ``progress.json`` is
renamed last and is the commit point, so a run killed at any instant (even ``kill -9``) leaves
either the previous block's state or the new one. Files of blocks after ``next_block`` are
leftovers of an interrupted write and are ignored.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from .errors import CheckpointError
from .io import write_failure
from .report import LayerRecord

FORMAT_VERSION = 1

#: Quantized parameters of finished layers: ``{module path: {parameter name: array}}``.
LayerParams = dict[str, dict[str, mx.array]]


@attrs.define
class ResumeState:
    """What the walker needs to continue: blocks ``< next_block`` are finished."""

    next_block: int
    inputs: list[mx.array]
    layers: LayerParams
    records: list[LayerRecord]


class Checkpoint(abc.ABC):
    """Where the walker keeps its state between blocks."""

    @abc.abstractmethod
    def load(self) -> ResumeState | None:
        """The state after the last finished block, or ``None`` to start from block 0."""

    @abc.abstractmethod
    def save(self, block: int, layers: LayerParams, records: list[LayerRecord],
             inputs: list[mx.array]) -> None:
        """Record that ``block`` is finished: its layers' parameters and records, and the
        inputs of the next block. Must be atomic: after a crash ``load`` sees all or none."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    """The checkpoint directory of a run writing ``out_dir``: ``.NAME.checkpoint`` beside it."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.checkpoint"


def fingerprint(model_dir: str | Path, tokens: mx.array, **settings: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the model's config and weight files,
    the calibration tokens (text, sample choice and seed) and the run's ``settings``."""
    model_dir = Path(model_dir)
    files = sorted(
        (f.name, f.stat().st_size) for f in model_dir.glob("*.safetensors") if f.is_file()
    )
    config = (model_dir / "config.json").read_bytes()
    tok = mx.array(tokens).astype(mx.int32)
    return _jsonable({
        "model": {"config_sha256": hashlib.sha256(config).hexdigest(), "files": files},
        "tokens": {"shape": list(tok.shape), "sha256": hashlib.sha256(memoryview(tok)).hexdigest()},
        **settings,
    })


def read_progress(path: str | Path) -> int | None:
    """Blocks finished in the checkpoint at ``path`` (``None`` when there is none)."""
    try:
        return int(json.loads((Path(path) / "progress.json").read_text())["next_block"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DirectoryCheckpoint(Checkpoint):
    """A checkpoint kept in one directory (see the module docstring for its layout).

    Use as a context manager: entering creates the directory, writes ``meta.json`` and takes an
    exclusive lock, so two runs never share a checkpoint. ``load`` raises
    :class:`CheckpointError` when the directory belongs to a run with another fingerprint."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = _jsonable(fingerprint)
        self._lock_fd: int | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> DirectoryCheckpoint:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            if not (self.path / "meta.json").exists():
                self._write_text("meta.json", json.dumps(
                    {"version": FORMAT_VERSION, "fingerprint": self.fingerprint}, indent=1))
        except OSError as exc:
            self._unlock()
            raise CheckpointError(f"cannot write the checkpoint {self.path} ({exc.strerror or exc}); "
                                  "choose a writable output path or pass --no-checkpoint") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def discard(self) -> None:
        """Delete the checkpoint (after the output was written)."""
        self._unlock()
        shutil.rmtree(self.path, ignore_errors=True)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no locking
            return
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"another quantkit run is using the checkpoint {self.path}; wait for it or "
                "choose another output path") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # -- the Checkpoint interface -------------------------------------------------------------

    def load(self) -> ResumeState | None:
        meta_path = self.path / "meta.json"
        if not (self.path / "progress.json").exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            progress = json.loads((self.path / "progress.json").read_text())
            next_block = int(progress["next_block"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(exc) from None
        if meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.path} has format version {meta.get('version')!r}, this quantkit "
                f"writes {FORMAT_VERSION}; start over with --overwrite")
        differs = _first_difference(meta.get("fingerprint", {}), self.fingerprint)
        if differs is not None:
            differs = _SETTING_NAMES.get(differs.split(".")[0], differs)
            raise CheckpointError(
                f"checkpoint {self.path} was made by a run with a different {differs}; rerun with "
                "the same model, calibration, seed and recipe, or pass --overwrite to start over")
        layers: LayerParams = {}
        records: list[LayerRecord] = []
        try:
            for i in range(next_block):
                for key, value in mx.load(str(self.path / f"block-{i:04d}.safetensors")).items():
                    module, _, name = key.partition(":")
                    layers.setdefault(module, {})[name] = value
                raw = json.loads((self.path / f"block-{i:04d}.json").read_text())
                records.extend(LayerRecord(**r) for r in raw)
            inputs: list[mx.array] = []
            if progress.get("inputs"):
                saved = mx.load(str(self.path / progress["inputs"]))
                inputs = [saved[str(b)] for b in range(len(saved))]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise self._damaged(exc) from None
        mx.eval(inputs, [list(v.values()) for v in layers.values()])
        return ResumeState(next_block=next_block, inputs=inputs, layers=layers, records=records)

    def save(self, block, layers, records, inputs) -> None:
        try:
            params = {f"{m}:{k}": v for m, ps in layers.items() for k, v in ps.items()}
            self._write_arrays(f"block-{block:04d}.safetensors", params)
            self._write_text(f"block-{block:04d}.json",
                             json.dumps([attrs.asdict(r) for r in records]))
            inputs_name = None
            if inputs:
                inputs_name = f"inputs-{block:04d}.safetensors"
                self._write_arrays(inputs_name, {str(b): x for b, x in enumerate(inputs)})
            previous = self._inputs_name()
            self._write_text("progress.json",
                             json.dumps({"next_block": block + 1, "inputs": inputs_name}))
            if previous and previous != inputs_name:
                (self.path / previous).unlink(missing_ok=True)
        except (OSError, RuntimeError) as exc:  # MLX's writer raises RuntimeError on a full disk
            raise CheckpointError(
                f"writing the checkpoint {self.path} failed after block {block} "
                f"({write_failure(exc, self.path)}); free disk space, then rerun with --resume "
                "or pass --no-checkpoint") from None

    # -- files --------------------------------------------------------------------------------

    def _inputs_name(self) -> str | None:
        try:
            return json.loads((self.path / "progress.json").read_text()).get("inputs")
        except (OSError, ValueError):
            return None

    def _damaged(self, exc: BaseException) -> CheckpointError:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CheckpointError(f"checkpoint {self.path} is damaged ({why}); delete it or pass "
                               "--overwrite to start over")

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".tmp-{name}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)

    def _write_arrays(self, name: str, arrays: dict[str, mx.array]) -> None:
        tmp = self.path / f".tmp-{name}"  # ends in .safetensors: MLX appends nothing
        mx.save_safetensors(str(tmp), arrays)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path / name)


_SETTING_NAMES = {
    "model": "model (config.json or weight files)",
    "tokens": "calibration data (text, --seed, --num-samples or --seq-len)",
    "recipe": "recipe (--recipe, --bits, --group-size or --strategy)",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Dotted name of the first setting where fingerprints ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            d = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if d is not None:
                return d
        return None
    return None if a == b else (where or "fingerprint")
