"""Memory of the CPU (NumPy backend) walk: shard statistics that wait in the merge tree are
parked in scratch files, and the walk gives the same bytes with or without that."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from quantkit import Recipe
from quantkit import walker as walker_module
from quantkit.hessian import HessianStats
from quantkit.host import row_slices_exact
from quantkit.pipeline import collect as collect_module
from quantkit.pipeline.collect import park
from quantkit.walker import ModelWalker

#: Row chunks and one-layer-at-a-time solves are used only where this machine's BLAS gives a
#: product's row slices bit for bit (with many OpenBLAS threads, e.g. on the 16-core GPU
#: machine, it may not): elsewhere the walker runs whole batches and stacked rows.
needs_exact_row_slices = pytest.mark.skipif(
    not row_slices_exact(), reason="this machine's BLAS does not give a product's row slices "
    "bit for bit, so the walker does not run in row chunks here")


def _tiny_llama() -> nn.Module:
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
        tie_word_embeddings=False,
    ))
    mx.eval(model.parameters())
    return model


def _numpy_walk(tokens: mx.array) -> dict:
    """The tiny llama's parameters after a GPTQ walk on the NumPy backend, batches of 2."""
    model = _tiny_llama()
    ModelWalker(Recipe.uniform("gptq", bits=4, group_size=32), batch_size=2,
                backend="numpy").run(model, tokens)
    return dict(tree_flatten(model.parameters()))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_parked_statistics_are_the_same_values_and_objects(tmp_path):
    shared = HessianStats(h=mx.random.normal((256, 256)), n_tokens=10)
    own = HessianStats(h=mx.random.normal((64, 64)), n_tokens=3)
    empty = HessianStats(h=mx.zeros((8, 8)), n_tokens=0)
    mx.eval(shared.h, own.h)
    expected = {"shared": np.array(shared.h), "own": np.array(own.h)}
    before = mx.get_active_memory()
    parked = park({"q": shared, "k": shared, "o": own, "e": empty}, tmp_path / "0.safetensors")
    del shared, own
    # Lazy loads of the file: the arrays' memory is freed until a merge reads them (the walker
    # parks statistics on a CPU only, collect.parking(passes.host); a GPU's frees follow its
    # command buffers).
    if mx.default_device() == mx.cpu:
        assert mx.get_active_memory() <= before - 256 * 256 * 4
    assert parked["q"] is parked["k"]  # layers reading one input stay one object
    assert parked["e"] is empty  # no tokens: left as it is (lazy zeros)
    assert (parked["q"].n_tokens, parked["o"].n_tokens) == (10, 3)
    np.testing.assert_array_equal(np.array(parked["q"].h), expected["shared"])
    np.testing.assert_array_equal(np.array(parked["o"].h), expected["own"])


def test_walk_is_byte_identical_with_and_without_parking(monkeypatch):
    tokens = mx.random.randint(0, 128, (8, 32), key=mx.random.key(1))

    # 4 batches over 8 shards: partial statistics wait in the tree.
    walk = lambda: _numpy_walk(tokens)  # noqa: E731

    calls = []
    real = collect_module.parking

    def counting(on):
        calls.append(on)
        return real(on)

    monkeypatch.setattr(collect_module, "parking", counting)
    parked = walk()
    assert calls and all(calls)  # the NumPy backend parks
    monkeypatch.setattr(collect_module, "parking", lambda on: real(False))
    plain = walk()
    _assert_same(parked, plain)


def test_parked_activations_read_back_the_same_bytes_lazily(tmp_path):
    from quantkit.pipeline.activations import ParkedActivations

    batches = [mx.random.normal((2, 16, 64), key=mx.random.key(k)) for k in range(3)]
    mx.eval(batches)
    expected = [np.array(b) for b in batches]
    before = mx.get_active_memory()
    acts = ParkedActivations(tmp_path, batches)
    del batches
    # On a CUDA GPU an op's inputs are freed when its command buffer completes: wait for that.
    mx.synchronize()
    # Only files now: the batches' memory is freed until one is read.
    assert mx.get_active_memory() <= before - 3 * 2 * 16 * 64 * 4
    assert len(acts) == 3 and len(list(tmp_path.iterdir())) == 3
    for k in range(3):
        np.testing.assert_array_equal(np.array(acts[k]), expected[k])
    acts[1] = acts[1] * 2  # replaced: the old file goes, the new value reads back
    assert len(list(tmp_path.iterdir())) == 3
    np.testing.assert_array_equal(np.array(acts[1]), expected[1] * 2)
    np.testing.assert_array_equal(np.array(acts[2]), expected[2])


def test_walk_is_byte_identical_with_and_without_parked_activations(monkeypatch):
    tokens = mx.random.randint(0, 128, (8, 32), key=mx.random.key(1))

    walk = lambda: _numpy_walk(tokens)  # noqa: E731

    real = walker_module.activation_store
    calls = []

    def counting(on):
        calls.append(on)
        return real(on)

    monkeypatch.setattr(walker_module, "activation_store", counting)
    parked = walk()
    assert calls == [True]  # the NumPy backend parks its activations
    monkeypatch.setattr(walker_module, "activation_store", lambda on: real(False))
    plain = walk()
    _assert_same(parked, plain)


@needs_exact_row_slices
def test_walk_in_row_chunks_is_byte_identical(monkeypatch):
    """The MLP run 64 rows at a time (4 chunks of each 256-row batch, in the collection passes,
    the passes a tail cut ends inside a chunk, and the last forward pass) gives the same bytes
    as in one piece; collectors gather whole inputs."""
    from quantkit.pipeline import calibrate

    tokens = mx.random.randint(0, 128, (8, 64), key=mx.random.key(1))
    chunks = []
    real_chunk = collect_module.RowChunks.__call__

    def counting(self, x):
        chunks.append(-(-x.size // x.shape[-1] // self.rows))
        return real_chunk(self, x)

    ends = []
    real_called = calibrate.TailCut.called

    def called(self, path):
        try:
            real_called(self, path)
        except calibrate.ChunkEnd:
            ends.append(path)
            raise

    monkeypatch.setattr(collect_module.RowChunks, "__call__", counting)
    monkeypatch.setattr(calibrate.TailCut, "called", called)

    def walk(row_bytes):
        monkeypatch.setattr(collect_module, "ROW_CHUNK_BYTES", row_bytes)
        model = _tiny_llama()
        ModelWalker(Recipe.uniform("gptq", bits=4, group_size=32), batch_size=4,
                    backend="numpy").run(model, tokens)
        return dict(tree_flatten(model.parameters()))

    chunked = walk(64 * 256 * 4)  # 64 rows of the 256-wide MLP
    # 2 blocks × (2 collection passes + 2 last forward passes), 4 chunks each; the second
    # collection pass of each block ends 3 chunks early at the down projection's input.
    assert chunks == [4] * 8
    assert ends == ["model.layers.0.mlp.down_proj"] * 3 + ["model.layers.1.mlp.down_proj"] * 3
    chunks.clear()
    whole = walk(2**40)
    assert chunks == [1] * 8
    assert chunked.keys() == whole.keys()
    for k in whole:
        np.testing.assert_array_equal(np.array(chunked[k]), np.array(whole[k]), err_msg=k)


@pytest.mark.parametrize("options", [{}, {"act_order": True, "scale_search": "hessian"}])
@needs_exact_row_slices
def test_layers_sharing_a_hessian_solved_one_by_one_give_the_stacked_result(monkeypatch, options):
    """On the host, q/k/v and gate/up are factorized once and solved one layer at a time with
    the shared factor (with act-order: the permuted Hessian's, as the default pipeline's GPTQ
    runs): the same bytes as solving their stacked rows as one matrix."""
    tokens = mx.random.randint(0, 128, (8, 32), key=mx.random.key(1))
    real = walker_module.solve_jointly
    seen = []

    def walk(forced):
        def solve(group, stats, one_by_one=False, factor=None):
            seen.append((len(group), one_by_one))  # what the walker asks for
            return real(group, stats, one_by_one=forced, factor=factor)

        monkeypatch.setattr(walker_module, "solve_jointly", solve)
        model = _tiny_llama()
        ModelWalker(Recipe.uniform("gptq", bits=4, group_size=32, **options), batch_size=2,
                    backend="numpy").run(model, tokens)
        return dict(tree_flatten(model.parameters()))

    from quantkit.quantizers import GPTQQuantizer

    shared = []
    real_shared = GPTQQuantizer.shared_solver
    monkeypatch.setattr(GPTQQuantizer, "shared_solver",
                        lambda self, *a: shared.append(1) or real_shared(self, *a))
    separate = walk(True)
    # the walker asks for it; per block: q/k/v (3), o, gate/up (2), down
    assert (3, True) in seen and (2, True) in seen
    # with act-order through the quantizer's shared solver (one factorization per group)
    assert len(shared) == (2 * 2 if options else 0)
    stacked = walk(False)
    assert separate.keys() == stacked.keys()
    for k in stacked:
        np.testing.assert_array_equal(np.array(separate[k]), np.array(stacked[k]), err_msg=k)


def test_act_order_factor_permutes_while_copying_the_same_bytes():
    """GPTQ's act-order factorizes the permuted Hessian: permuted while it is copied to float64
    (no permuted float32 copy held), the same factor bit for bit as of the permuted copy, for
    both inverse strategies; dead inputs and damping follow the permutation."""
    from quantkit.inverse import DampedCholesky, EscalatingCholesky
    from quantkit.kernels.linalg import prepare_hessians

    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 300)).astype(np.float32)
    x[:, 7] = 0.0  # a dead input
    h = x.T @ x
    perm = np.argsort(-np.diagonal(h), kind="stable")
    permuted = np.ascontiguousarray(h[perm][:, perm])
    direct, damp, dead = prepare_hessians(h[None], 0.01, perm)
    ref, ref_damp, ref_dead = prepare_hessians(permuted[None], 0.01)
    assert np.array_equal(direct, ref) and np.array_equal(damp, ref_damp)
    assert dead.tolist() == ref_dead.tolist() == [1]
    for strategy in (DampedCholesky(0.01), EscalatingCholesky(0.01)):
        a = strategy.factor_permuted(mx.array(h), perm)
        b = strategy.factor(mx.array(permuted))
        assert np.array_equal(np.array(a.u), np.array(b.u)) and a.n_dead == b.n_dead == 1
