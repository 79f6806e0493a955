"""Model directories in and out: load with clear errors, save what ``mlx_lm.load`` reads."""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .errors import ModelLoadError, OutputError, describe
from .interrupt import check
from .validate import check_model_dir, not_quantkit_output

#: Files copied from the source directory: tokenizer, chat template, generation settings.
COPY_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantization_report.json"}


def load_model(
    path: str | Path, *, allow_quantized: bool = False, lazy: bool = False,
    check_finite: bool = True,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, config)`` from a local mlx-lm model directory (never downloads).

    ``allow_quantized``: accept an already quantized directory (for evaluation);
    ``lazy``: do not read the weights until they are used (quantization streams them block by
    block; mlx-lm's sharded layout and a model's ``sanitize`` work lazily too);
    ``check_finite``: refuse NaN/Inf weights, checked from the files a chunk at a time (see
    :func:`quantkit.pipeline.source.scan_weights`), never by evaluating the model."""
    from .mlxlm import load_float_model, plain_tokenizer

    path = Path(path)
    config = check_model_dir(path, allow_quantized)  # reliab: validation pass
    try:
        # the light path (no transformers import) for float models; mlx-lm's loader otherwise
        loaded = load_float_model(path, lazy=lazy)
        if loaded is None:
            from mlx_lm.utils import load_model as _load_model

            loaded = _load_model(path, lazy=lazy)
        model, config = loaded
    except ValueError as exc:
        msg = describe(exc)
        if "not supported" in msg or "model_type" in msg:
            raise ModelLoadError(f"model_type {config['model_type']!r} is not supported by the installed mlx-lm ({msg})") from None
        raise ModelLoadError(f"cannot load {path}: {msg}") from None
    except Exception as exc:  # corrupt safetensors, shape mismatches, ...
        msg = describe(exc)
        raise ModelLoadError(f"cannot load weights from {path}: {msg}; the files may be truncated or corrupt") from None
    check("load")  # a signal during loading
    if check_finite:
        from .pipeline.source import scan_weights

        scan_weights(path)
    try:
        tokenizer = plain_tokenizer(path)
        if tokenizer is None:
            from mlx_lm.utils import load_tokenizer

            tokenizer = load_tokenizer(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {describe(exc)}") from None
    return model, tokenizer, config


def check_output(
    out_dir: str | Path, overwrite: bool = False, source_dir: str | Path | None = None
) -> Path:
    """Fail fast, before any work, when ``out_dir`` cannot be (over)written. Returns it absolute.

    ``--overwrite`` only ever replaces a directory quantkit wrote (see
    :func:`quantkit.validate.not_quantkit_output`) or an empty one, and never the source model or
    a directory containing it."""
    out_dir = Path(out_dir).absolute()
    if source_dir is not None:
        src = Path(source_dir).resolve()
        target = out_dir.resolve()
        if target == src or target in src.parents:
            raise OutputError(f"output directory {out_dir} would replace the model directory {source_dir}; choose another path")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise OutputError(f"output path {out_dir} exists and is not a directory; remove it or choose another path")
        foreign = not_quantkit_output(out_dir)
        if foreign is not None:
            raise OutputError(f"output directory {out_dir} already exists and was not written by quantkit "
                              f"({foreign}); --overwrite only replaces quantkit's own output: choose another path")
        if not overwrite:
            raise OutputError(f"output directory {out_dir} already exists; pass --overwrite or another path")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = _make_hidden_dir(parent, out_dir.name, "probe")
        probe.rmdir()
    except OSError as exc:
        raise OutputError(f"cannot write to {parent} ({_why(exc)}); choose a writable output path") from None
    return out_dir


def save_model(
    out_dir: str | Path, model: nn.Module, config: dict[str, Any], source_dir: str | Path,
    extra_files: dict[str, str] | None = None, overwrite: bool = False,
) -> Path:
    """Write safetensors, config.json (with ``quantization`` and ``quantization_config``), the
    tokenizer files of ``source_dir`` and ``extra_files`` into ``out_dir``, atomically.

    Everything is written into a hidden sibling ``.NAME.partial-PID-XXXX``, flushed to disk, and
    renamed to ``out_dir`` only when complete, so ``out_dir`` is either absent, the previous
    output, or the complete new one; on any failure the partial directory is removed and an
    existing output is left untouched. Leftovers of killed runs (whose process is gone) are
    removed first."""
    from mlx_lm.utils import save_model as _save_model

    return _write_atomically(out_dir, config, source_dir, extra_files, overwrite,
                             lambda tmp: _save_model(tmp, model, donate_model=False))


def save_streamed(
    out_dir: str | Path, model: nn.Module, config: dict[str, Any], source_dir: str | Path,
    blocks: list[Path], *, keep_blocks: bool, extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Like :func:`save_model`, for a model whose decoder blocks were already written, one file
    each (``blocks``, in block order, see :mod:`quantkit.pipeline.shards`): those files become
    the output's first shards (hard-linked when ``keep_blocks``, else moved) and the model's
    other tensors the last one. Atomic in the same way."""
    from mlx.utils import tree_flatten

    from .pipeline.shards import assemble, tensor_names

    def weights(tmp: Path) -> None:
        written = {name for f in blocks for name in tensor_names(f)}
        rest = {k: v for k, v in tree_flatten(model.parameters()) if k not in written}
        assemble(tmp, blocks, rest, model, keep_blocks=keep_blocks)

    return _write_atomically(out_dir, config, source_dir, extra_files, overwrite, weights)


def _write_atomically(
    out_dir: str | Path, config: dict[str, Any], source_dir: str | Path,
    extra_files: dict[str, str] | None, overwrite: bool, write_weights: Callable[[Path], None],
) -> Path:
    """The output directory written into a hidden partial sibling (weights by
    ``write_weights(tmp)``, then config.json, the source's tokenizer files and ``extra_files``),
    flushed, and renamed into place; on any failure the partial directory is removed."""
    from .mlxlm import write_config

    out_dir = check_output(out_dir, overwrite, source_dir)
    parent = out_dir.parent
    remove_stale(parent, out_dir.name)
    try:
        tmp = _make_hidden_dir(parent, out_dir.name, "partial")
    except OSError as exc:
        raise OutputError(f"cannot write to {parent} ({_why(exc)}); choose a writable output path") from None
    try:
        write_weights(tmp)
        write_config(config, tmp / "config.json")
        for pattern in COPY_PATTERNS:
            for src in sorted(Path(source_dir).glob(pattern)):
                if src.is_file() and src.name not in NOT_COPIED:
                    shutil.copyfile(src, tmp / src.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _fsync_tree(tmp)
        check("write")  # nothing appears after the user stopped the run (quantkit.interrupt)
        _replace_dir(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, OutputError):
            raise OutputError(f"writing {out_dir} failed ({write_failure(exc, parent)}); nothing "
                              "was written — free disk space or choose another path") from None
        raise
    return out_dir


def block_staging_dir(out_dir: str | Path) -> Path:
    """A new hidden ``.NAME.partial-PID-XXXX`` beside ``out_dir`` for the block files of a run
    without checkpoint (removed as a stale partial if the run is killed)."""
    out_dir = Path(out_dir).absolute()
    try:
        return _make_hidden_dir(out_dir.parent, out_dir.name, "partial")
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir.parent} ({_why(exc)}); choose a writable "
                          "output path") from None


# -- helpers for atomic directories --------------------------------------------------------

_HIDDEN_KINDS = ("partial", "old", "probe")


def _make_hidden_dir(parent: Path, name: str, kind: str) -> Path:
    """A new empty directory ``parent/.NAME.KIND-PID-RANDOM`` (mode from the umask)."""
    while True:
        path = parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` siblings left by runs that were killed (their
    process no longer exists). Returns what was removed."""
    removed = []
    for kind in _HIDDEN_KINDS:
        prefix = f".{name}.{kind}-"
        for path in parent.glob(f".{glob.escape(name)}.{kind}-*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process always does). A zombie does not: a killed
    rank whose new parent (a container's PID 1, say) never reaps it keeps its PID but will never
    touch its files again."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc/self/stat").exists():
        return True  # no /proc (macOS): the signal test is all there is
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False  # exited in between
    return state not in ("Z", "X")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted
    only once the new one is in place (restored if the rename fails)."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directory) to disk before it is renamed."""
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    """A short reason for an OS error: "no space left on device", "permission denied", ..."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return (exc.strerror or _first_line(exc) or type(exc).__name__).lower()


def write_failure(exc: BaseException, directory: Path) -> str:
    """Why writing under ``directory`` failed. MLX's own writer reports a full disk as a
    ``RuntimeError`` ("Unable to write ... bytes"), so the free space is added to such reasons."""
    if isinstance(exc, OSError):
        return _why(exc)
    reason = f"{type(exc).__name__}: {_first_line(exc)}"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return reason
    return f"{reason}; {free / 2**20:.0f} MiB free there — is the disk full?"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
