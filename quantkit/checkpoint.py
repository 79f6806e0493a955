"""Where finished blocks go: output shards that are also the checkpoint of a resumable run.

After block ``i`` the walker hands a :class:`Checkpoint` the block's tensors (every parameter
under the block's path, in the dtypes the output stores) and its layers' report records. The
checkpoint writes them as one safetensors file, which becomes shard ``i + 1`` of the output
(see :mod:`quantkit.pipeline.shards`), and the walker replaces the block's arrays by lazy loads
of that file. Nothing else is saved: on resume, the next block's inputs are recomputed by
running the finished (quantized) blocks on the calibration tokens, exactly as the first run
computed them, so the result is byte-identical.

:class:`BlockFiles` keeps the files in a directory and cannot be resumed (``--no-checkpoint``).
:class:`DirectoryCheckpoint` keeps them in a hidden sibling of the output directory,
``.NAME.checkpoint/``::

    meta.json                 format version + fingerprint of the run (model bytes, tokens, recipe...)
    block-0003.safetensors    block 3's tensors (the output's shard 4)
    block-0003.json           report records of block 3's layers
    progress.json             {"next_block": 4, "meta_sha256": ..., "blocks": [{"file", "sha256",
                              "records", "records_sha256"} per finished block]}
    lock                      held (flock) by the run using the checkpoint

Every file is written under a temporary name and renamed into place; ``progress.json`` is
renamed last and is the commit point, so a run killed at any instant (even ``kill -9``) leaves
either the previous block's state or the new one. A fresh run whose fingerprint is not yet
known (the weights' sha256s are computed beside the first blocks) writes its first blocks'
files and commits them together once it is. Before a resume, every file ``progress.json``
names is checked against the sha256 recorded when it was written, and ``meta.json`` against
its recorded hash: an edited, damaged or rolled-back checkpoint is refused with one line, and
never deleted (only ``--overwrite`` discards a checkpoint). Files of blocks after
``next_block`` are leftovers of an interrupted write and are ignored.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from .errors import CheckpointError
from .io import write_failure
from .pipeline.shards import block_file_name, file_sha256, write_arrays
from .report import LayerRecord

FORMAT_VERSION = 2


@attrs.define
class ResumeState:
    """What the walker needs to continue: blocks ``< next_block`` are finished, their tensors in
    ``files`` (verified), their layers' ``records``."""

    next_block: int
    files: list[Path]
    records: list[LayerRecord]


class Checkpoint(abc.ABC):
    """Where the walker puts each finished block."""

    @abc.abstractmethod
    def load(self) -> ResumeState | None:
        """The finished blocks of an earlier run, or ``None`` to start from block 0."""

    @abc.abstractmethod
    def save(self, block: int, arrays: dict[str, mx.array], records: list[LayerRecord]) -> Path:
        """Record that ``block`` is finished: write its tensors and records; return the file
        holding the tensors. Atomic: after a crash ``load`` sees all or none."""

    @abc.abstractmethod
    def files(self) -> list[Path]:
        """The block files, in block order (those loaded, then those saved)."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    """The checkpoint directory of a run writing ``out_dir``: ``.NAME.checkpoint`` beside it."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.checkpoint"


def fingerprint(model_dir: str | Path, tokens: mx.array, *,
                weight_digests: dict[str, str] | None = None, **settings: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the model's config and the content of
    its weight files (``weight_digests``: ``{file name: sha256}``, see
    :func:`quantkit.pipeline.source.scan_weights`; sizes only when not given), the calibration
    tokens (text, sample choice and seed) and the run's ``settings``."""
    model_dir = Path(model_dir)
    files = sorted(
        (f.name, f.stat().st_size, (weight_digests or {}).get(f.name))
        for f in model_dir.glob("*.safetensors") if f.is_file()
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


def holds_blocks(path: str | Path) -> bool:
    """Whether the checkpoint directory ``path`` holds a committed block (a ``progress.json``,
    readable or not). Block files no ``progress.json`` lists were never committed (a run
    stopped before its first commit): no resume would use them."""
    return (Path(path) / "progress.json").exists()


class BlockFiles(Checkpoint):
    """Block files in ``directory``, no resume (``--no-checkpoint``)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        self._files: list[Path] = []

    def load(self) -> ResumeState | None:
        return None

    def files(self) -> list[Path]:
        return list(self._files)

    def save(self, block, arrays, records) -> Path:
        path = self.path / block_file_name(block)
        try:
            write_arrays(path, arrays)
        except (OSError, RuntimeError) as exc:  # MLX's writer raises RuntimeError on a full disk
            raise self._write_error(block, exc) from None
        self._files.append(path)
        return path

    def _write_error(self, block: int, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"writing block {block} into {self.path} failed ({write_failure(exc, self.path)}); "
            "free disk space and rerun")


class DirectoryCheckpoint(BlockFiles):
    """A checkpoint kept in one directory (see the module docstring for its layout).

    Use as a context manager: entering creates the directory, writes ``meta.json`` and takes an
    exclusive lock, so two runs never share a checkpoint. ``load`` raises
    :class:`CheckpointError` when the directory belongs to a run with another fingerprint, or
    when any of its files is not what was written."""

    def __init__(self, path: str | Path,
                 fingerprint: dict[str, Any] | Callable[[], dict[str, Any]],
                 ready: Callable[[], bool] | None = None) -> None:
        super().__init__(path)
        #: The run's fingerprint, or a function computing it (e.g. waiting for the weights'
        #: hashes, computed in the background): then ``meta.json`` is written at the first
        #: commit, and ``load`` waits for it.
        self._fingerprint = fingerprint if callable(fingerprint) else _jsonable(fingerprint)
        #: Whether calling ``fingerprint`` would not wait. While it would, a fresh run's
        #: finished blocks are written but not committed (no ``progress.json``): the run goes
        #: on instead of waiting for the weights' hashes, and the first save after they are
        #: known (or :meth:`flush`) commits every block written so far at once.
        self._ready = ready
        self._lock_fd: int | None = None
        self._blocks: list[dict[str, str]] = []
        #: Entries of ``_blocks`` that ``progress.json`` lists.
        self._listed = 0
        #: This run made the directory (so it may remove it when it committed nothing).
        self.created = False
        #: Blocks this run committed.
        self.committed = 0

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> DirectoryCheckpoint:
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            if (not callable(self._fingerprint) and not (self.path / "meta.json").exists()
                    and not (self.path / "progress.json").exists()):
                self._write_text("meta.json", self._meta_text())
        except OSError as exc:
            self._unlock()
            raise CheckpointError(f"cannot write the checkpoint {self.path} ({exc.strerror or exc}); "
                                  "choose a writable output path or pass --no-checkpoint") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def discard(self) -> None:
        """Delete the checkpoint (after the output was written, or on --overwrite)."""
        self._unlock()
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def fingerprint(self) -> dict[str, Any]:
        if callable(self._fingerprint):
            self._fingerprint = _jsonable(self._fingerprint())
        return self._fingerprint

    def _meta_text(self) -> str:
        return json.dumps({"version": FORMAT_VERSION, "fingerprint": self.fingerprint}, indent=1)

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
        if not (self.path / "progress.json").exists():
            return None
        try:
            progress = json.loads((self.path / "progress.json").read_text())
            next_block = int(progress["next_block"])
            blocks = list(progress["blocks"])
            meta_sha = str(progress["meta_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(f"progress.json: {_first_line(exc)}") from None
        try:
            meta_bytes = (self.path / "meta.json").read_bytes()
            meta = json.loads(meta_bytes)
        except (OSError, ValueError) as exc:
            raise self._damaged(f"meta.json: {_first_line(exc)}") from None
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            raise CheckpointError(
                f"checkpoint {self.path} has format version {version!r}, this quantkit "
                f"writes {FORMAT_VERSION}; delete it or pass --overwrite to start over")
        if hashlib.sha256(meta_bytes).hexdigest() != meta_sha:
            raise self._damaged("meta.json is not the one its blocks were made with")
        differs = _first_difference(meta.get("fingerprint", {}), self.fingerprint)
        if differs is not None:
            differs = _SETTING_NAMES.get(differs.split(".")[0], differs)
            raise CheckpointError(
                f"checkpoint {self.path} was made by a run with a different {differs}; rerun with "
                "the same model, calibration, seed and recipe, or pass --overwrite to start over")
        if len(blocks) != next_block:
            raise self._damaged(f"progress.json lists {len(blocks)} blocks but says {next_block} are done")
        files: list[Path] = []
        records: list[LayerRecord] = []
        for i, entry in enumerate(blocks):
            try:
                name, sha = str(entry["file"]), str(entry["sha256"])
                rname, rsha = str(entry["records"]), str(entry["records_sha256"])
            except (KeyError, TypeError) as exc:
                raise self._damaged(f"progress.json: block {i}: {_first_line(exc)}") from None
            if name != block_file_name(i):
                raise self._damaged(f"progress.json names {name} for block {i}")
            for fname, expected in ((name, sha), (rname, rsha)):
                try:
                    actual = file_sha256(self.path / fname)
                except OSError as exc:
                    raise self._damaged(f"{fname}: {exc.strerror or exc}") from None
                if actual != expected:
                    raise self._damaged(f"{fname} does not match the sha256 recorded when it was written")
            try:
                records.extend(LayerRecord(**r) for r in json.loads((self.path / rname).read_text()))
            except (OSError, ValueError, TypeError) as exc:
                raise self._damaged(f"{rname}: {_first_line(exc)}") from None
            files.append(self.path / name)
        self._blocks = blocks
        self._listed = len(blocks)
        self._files = list(files)
        return ResumeState(next_block=next_block, files=files, records=records)

    def save(self, block, arrays, records) -> Path:
        name, rname = block_file_name(block), f"block-{block:04d}.json"
        try:
            sha = write_arrays(self.path / name, arrays)
            rtext = json.dumps([attrs.asdict(r) for r in records])
            self._write_text(rname, rtext)
            self._blocks.append({"file": name, "sha256": sha, "records": rname,
                                 "records_sha256": hashlib.sha256(rtext.encode()).hexdigest()})
            self._files.append(self.path / name)
            if self._listed or self._ready is None or self._ready():
                self._commit()
        except (OSError, RuntimeError) as exc:  # MLX's writer raises RuntimeError on a full disk
            raise self._commit_error(exc, f" after block {block}") from None
        return self.path / name

    def flush(self) -> None:
        """Commit the blocks written but not yet committed (waiting for the fingerprint)."""
        if len(self._blocks) > self._listed:
            try:
                self._commit()
            except OSError as exc:
                raise self._commit_error(exc) from None

    def _commit_error(self, exc: BaseException, when: str = "") -> CheckpointError:
        return CheckpointError(
            f"writing the checkpoint {self.path} failed{when} ({write_failure(exc, self.path)}); "
            "free disk space, then rerun with --resume or pass --no-checkpoint")

    def _commit(self) -> None:
        """List every written block in ``progress.json`` (the commit point); a fresh run's
        first commit writes ``meta.json`` before it."""
        if not self._listed and not (self.path / "progress.json").exists():
            self._write_text("meta.json", self._meta_text())
        meta_sha = file_sha256(self.path / "meta.json")
        self._write_text("progress.json", json.dumps({
            "next_block": len(self._blocks), "meta_sha256": meta_sha, "blocks": self._blocks}))
        self.committed += len(self._blocks) - self._listed
        self._listed = len(self._blocks)

    # -- files --------------------------------------------------------------------------------

    def _damaged(self, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path} is damaged or was edited ({why}); "
                               f"delete {self.path} or pass --overwrite to start over")

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".tmp-{name}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)


_SETTING_NAMES = {
    "model": "model (config.json or weight files)",
    "tokens": "calibration data (text, --seed, --num-samples or --seq-len)",
    "recipe": "recipe (--recipe, --bits, --group-size or --strategy)",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
