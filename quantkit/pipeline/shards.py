"""Finished blocks as output shards.

Each decoder block's tensors are written, once the block is quantized, as one safetensors file
(``block-0003.safetensors``: every parameter under ``model.layers.3.``, in its final dtype) and
the model's arrays for that block are replaced by lazy loads of the file, so the memory a run
holds does not grow with the number of blocks. At the end the tensors outside the blocks
(embedding, final norm, head) make one more file, and the files become the output's shards in
mlx-lm's layout: ``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``
(``N`` = blocks + 1; block ``i`` is shard ``i + 1``, the rest is shard ``N``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

#: What every shard carries in its metadata (as mlx-lm writes it).
METADATA = {"format": "mlx"}


def block_file_name(index: int) -> str:
    return f"block-{index:04d}.safetensors"


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_arrays(path: Path, arrays: dict[str, mx.array]) -> str:
    """Write ``arrays`` to ``path`` (under a temporary name, flushed, renamed into place) and
    return the file's sha256."""
    tmp = path.with_name(f".tmp-{path.name}")  # ends in .safetensors: MLX appends nothing
    mx.save_safetensors(str(tmp), arrays, metadata=METADATA)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, read into one reused 1 MiB buffer (the fingerprint's hash
    runs on a thread beside a block's work: 16 MiB reads showed in that block's peak)."""
    h = hashlib.sha256()
    buf = bytearray(2**20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def final_arrays(module: nn.Module, prefix: str, dtypes: dict[str, mx.Dtype]) -> dict[str, mx.array]:
    """``module``'s parameters keyed by full path (``prefix.name``) in the dtypes the output
    stores: each parameter's original dtype (``dtypes``), and for the scales and biases of a
    quantized layer, the dtype of the weight it replaced."""
    out: dict[str, mx.array] = {}
    flat: list[tuple[str, mx.array]] = tree_flatten(module.parameters())  # type: ignore[assignment]
    for name, value in flat:
        path = f"{prefix}.{name}" if prefix else name
        base, _, leaf = path.rpartition(".")
        target = dtypes.get(path)
        if leaf in ("scales", "biases") and value.dtype != mx.uint8:
            target = dtypes.get(f"{base}.weight", target)
        if target is not None and value.dtype != target and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(target)
        out[path] = value
    return out


def reload_lazily(model: nn.Module, path: Path) -> None:
    """Replace the model's arrays held in the file ``path`` by lazy loads of it: their memory is
    freed, and they are read again only if used."""
    arrays = cast(dict[str, mx.array], mx.load(str(path)))
    model.update(tree_unflatten(list(arrays.items())))


def tensor_names(path: Path) -> dict[str, int]:
    """``{tensor name: bytes}`` of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items() if k != "__metadata__"}


def assemble(directory: Path, blocks: list[Path], rest: dict[str, mx.array], model: nn.Module,
             *, keep_blocks: bool) -> None:
    """Make the output shards in ``directory``: the block files (hard-linked when
    ``keep_blocks`` — they stay a checkpoint until the output is in place — else moved), the
    ``rest`` tensors as the last shard, and ``model.safetensors.index.json``."""
    from ..mlxlm import total_parameters

    n = len(blocks) + 1
    weight_map: dict[str, str] = {}
    total = 0
    for k, src in enumerate(blocks, start=1):
        dest = directory / shard_name(k, n)
        if keep_blocks:
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        else:
            os.replace(src, dest)
        for name, nbytes in tensor_names(dest).items():
            weight_map[name] = dest.name
            total += nbytes
    last = shard_name(n, n)
    mx.save_safetensors(str(directory / last), rest, metadata=METADATA)
    for name, value in rest.items():
        weight_map[name] = last
        total += value.nbytes
    index: dict[str, Any] = {
        "metadata": {"total_size": total, "total_parameters": total_parameters(model)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def float_params_from_file(model: nn.Module, quantized_layers: list[str], path, prefix: str,
                           dtype: mx.Dtype | None) -> None:
    """Put the parameters of a finished block's file that are not quantized layers' into the
    model, in the calibration ``dtype`` (exactly the values the run used, unless a block
    transform changed them in a dtype the output rounds). ``quantized_layers``: the paths of
    the block's quantized layers (their arrays are left alone)."""
    quantized = tuple(p + "." for p in quantized_layers)
    updates = []
    for name, value in mx.load(str(path)).items():
        if not name.startswith(prefix + ".") or name.startswith(quantized):
            continue
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        updates.append((name, value))
    if updates:
        model.update(tree_unflatten(updates))
