"""Streaming: the weights stay on disk until a block uses them, a finished block's float weights
are dropped, the output is sharded in mlx-lm's layout, and sharded inputs work."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import shared_path
from mlx.utils import tree_flatten
from regression_matrix import tensor_digest

from quantkit import Recipe, quantize_directory, quantize_model
from quantkit.checkpoint import BlockFiles
from quantkit.io import load_model
from quantkit.pipeline.shards import shard_name

RECIPE = Recipe.uniform("gptq", bits=4, group_size=32)


def _save_tiny_llama(path: Path, layers: int = 4, hidden: int = 256) -> int:
    """A random float32 llama written as an mlx-lm directory; returns its weights' bytes."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": 2 * hidden, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512,
              "tie_word_embeddings": False}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    stories = shared_path("models", "stories260K")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(stories / name, path / name)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_loading_and_the_finite_check_read_no_weight_into_memory(tmp_path):
    nbytes = _save_tiny_llama(tmp_path / "m", layers=4)
    gc.collect()
    before = mx.get_active_memory()
    model, _, _ = load_model(tmp_path / "m", lazy=True)  # NaN/Inf check included
    held = mx.get_active_memory() - before
    assert held < nbytes / 20, f"loading held {held} bytes of a {nbytes}-byte model"
    mx.eval(model.parameters())  # the arrays were lazy, not absent
    assert mx.get_active_memory() - before >= nbytes * 0.9


def test_a_finished_block_drops_its_float_weights(tmp_path):
    """After block i is written, no array of its float layers is alive, and MLX's active
    memory at each block does not grow with the blocks done."""
    _save_tiny_llama(tmp_path / "m", layers=5)
    model, tokenizer, _ = load_model(tmp_path / "m", lazy=True)
    tokens = mx.random.randint(0, 512, (8, 32), key=mx.random.key(1))
    refs: dict[int, list[weakref.ref]] = {}
    active: list[int] = []

    def progress(event, info):
        if event != "block":
            return
        i = info["index"]
        gc.collect()
        for j in range(i):
            alive = [r for r in refs[j] if r() is not None]
            assert not alive, f"block {j}'s float weights are still referenced at block {i}"
        block = model.layers[i]
        refs[i] = [weakref.ref(v) for k, v in tree_flatten(block.parameters()) if k.endswith("proj.weight")]
        assert len(refs[i]) == 7
        active.append(mx.get_active_memory())

    store = BlockFiles(tmp_path / "blocks")
    (tmp_path / "blocks").mkdir()
    quantize_model(model, tokens, RECIPE, progress=progress, checkpoint=store)
    gc.collect()
    assert all(r() is None for rs in refs.values() for r in rs)
    assert [f.name for f in store.files()] == [f"block-{i:04d}.safetensors" for i in range(5)]
    block_bytes = sum(v.nbytes for _, v in tree_flatten(load_model(tmp_path / "m", lazy=True)[0]
                                                       .layers[0].parameters()))
    # Not growing: the last block starts with no more than half a float block more than block 1.
    assert active[-1] - active[1] < block_bytes / 2, active


def test_output_is_sharded_like_mlx_lm_and_generates(tmp_path):
    from mlx_lm import generate, load

    _save_tiny_llama(tmp_path / "m", layers=3)
    out = quantize_directory(tmp_path / "m", tmp_path / "q", RECIPE, num_samples=4, seq_len=32).out_dir
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [shard_name(k, 4) for k in range(1, 5)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = {}
    for f in shards:
        names.update({k: f for k in mx.load(str(out / f))})
    assert index["weight_map"] == dict(sorted(names.items()))
    assert all(k.startswith("model.layers.1.") for k, f in names.items() if f == shards[1])
    model, tokenizer = load(str(out))
    assert model.model.layers[2].mlp.down_proj.bits == 4
    assert isinstance(generate(model, tokenizer, "Once", max_tokens=4), str)


@pytest.mark.parametrize("fixture", ["stories260K-pad192", "stories260K-moe4"])
def test_sharded_source_gives_the_same_output(fixture, tmp_path):
    """A source in mlx-lm's sharded layout (two files + index; the MoE fixture in Hugging Face
    layout, stacked lazily by the model's ``sanitize``) quantizes to the same tensors."""
    src = shared_path("models", fixture)
    split = tmp_path / "split"
    shutil.copytree(src, split)
    (split / "model.safetensors").unlink()
    weights = mx.load(str(src / "model.safetensors"))
    names = sorted(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        mx.save_safetensors(str(split / shard_name(k, 2)), {n: weights[n] for n in part},
                            metadata={"format": "mlx"})
        weight_map.update({n: shard_name(k, 2) for n in part})
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    kw = dict(num_samples=4, seq_len=32, checkpoint=False)
    a = quantize_directory(src, tmp_path / "a", RECIPE, **kw)
    b = quantize_directory(split, tmp_path / "b", RECIPE, **kw)
    assert tensor_digest(a.out_dir) == tensor_digest(b.out_dir)


def test_a_sharded_model_is_scanned_on_threads_with_the_file_by_file_result(tmp_path):
    """Shards are scanned by several threads: the same sha256s as reading file after file, and
    of two damaged shards the first in name order is the one named."""
    import hashlib

    from quantkit.errors import ModelLoadError
    from quantkit.pipeline.source import scan_weights

    for k in range(5):
        w = mx.random.normal((256, 128), key=mx.random.key(k))
        mx.save_safetensors(str(tmp_path / f"model-{k:05d}-of-00005.safetensors"), {f"w{k}": w})
    expected = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(tmp_path.glob("*.safetensors"))}
    assert scan_weights(tmp_path, digest=True, workers=3) == expected
    assert scan_weights(tmp_path, digest=True, workers=1) == expected
    for k in (1, 3):  # two bad shards: shard 1's NaN is reported, whichever thread ends first
        bad = np.array(mx.random.normal((256, 128), key=mx.random.key(k)))
        bad[k, k] = np.nan
        mx.save_safetensors(str(tmp_path / f"model-{k:05d}-of-00005.safetensors"), {f"w{k}": mx.array(bad)})
    for workers in (1, 2, 5):
        with pytest.raises(ModelLoadError, match="weight w1 in .* has 1 NaN/Inf values"):
            scan_weights(tmp_path, workers=workers)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_finite_scan_finds_every_nan_and_inf(dtype, tmp_path):
    from quantkit.errors import ModelLoadError
    from quantkit.pipeline.source import scan_weights

    w = mx.random.normal((64, 48), key=mx.random.key(0)).astype(getattr(mx, dtype))
    bad = mx.array([float("nan"), float("inf"), -float("inf")]).astype(w.dtype)
    flat = mx.concatenate([w.reshape(-1)[:-3], bad]).reshape(64, 48)
    mx.save_safetensors(str(tmp_path / "ok.safetensors"), {"a": w, "b": w[:3]})
    assert scan_weights(tmp_path) == {}
    digests = scan_weights(tmp_path, digest=True)
    import hashlib

    assert digests == {"ok.safetensors": hashlib.sha256((tmp_path / "ok.safetensors").read_bytes()).hexdigest()}
    mx.save_safetensors(str(tmp_path / "z.safetensors"), {"m.weight": flat})
    with pytest.raises(ModelLoadError, match="weight m.weight in .* has 3 NaN/Inf values"):
        scan_weights(tmp_path)
