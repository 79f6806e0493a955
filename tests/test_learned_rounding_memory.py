"""Learned rounding holds less without computing anything else: its hand-written gradients are
MLX's automatic-differentiation values, and parking what it keeps aside (float layers, grid
positions, targets) in scratch files gives the same bytes as holding it in memory."""

from __future__ import annotations

import attrs
import mlx.core as mx
import numpy as np
import pytest
from test_block_methods import _quantized_block, _quantized_bytes, tiny_llama

from quantkit.arch import LLAMA
from quantkit.blocks.rounding import LearnedRounding
from quantkit.kernels.rounding import learned_weight, learned_weight_grads
from quantkit.pipeline.activations import ParkedLayers, activation_store


@pytest.mark.parametrize("bits,group_size,storage", [(4, 32, mx.bfloat16), (3, 16, mx.float16),
                                                     (2, 64, mx.float32)])
def test_learned_weight_grads_are_autodiff_values(bits, group_size, storage):
    """Weights on ties (x.5), at and beyond both ends of the grid, zero cotangents: every case
    where the masks and the straight-through rounding decide."""
    hi = (1 << bits) - 1
    k = iter(mx.random.split(mx.random.key(7), 12))
    rows, cols = 48, 4 * group_size
    groups = cols // group_size
    u = mx.random.uniform(-1.5, hi + 1.5, (rows, cols), key=next(k))
    u = mx.where(mx.random.uniform(shape=u.shape, key=next(k)) < 0.3, mx.floor(u) + 0.5, u)
    u = mx.where(mx.random.uniform(shape=u.shape, key=next(k)) < 0.2, mx.clip(mx.round(u), 0, hi), u)
    v = mx.random.uniform(-0.5, 0.5, u.shape, key=next(k))
    v = mx.where(mx.random.uniform(shape=u.shape, key=next(k)) < 0.4, mx.zeros_like(v), v)
    s0 = mx.random.uniform(0.01, 0.2, (rows, groups), key=next(k))
    b0 = mx.random.normal((rows, groups), key=next(k))
    ds = mx.random.uniform(-0.5, 0.5, s0.shape, key=next(k))
    db = mx.random.uniform(-1.0, 1.0, s0.shape, key=next(k))
    cot = mx.random.normal(u.shape, key=next(k))
    cot = mx.where(mx.random.uniform(shape=u.shape, key=next(k)) < 0.1, mx.zeros_like(cot), cot)

    def weight(v, ds, db):
        return learned_weight(u, v, s0, b0, ds, db, bits, storage)[0]

    _, auto = mx.vjp(weight, [v, ds, db], [cot])
    dv, dds, ddb = learned_weight_grads(u, v, s0, b0, ds, db, bits, storage, cot)
    for name, a, b in zip(("v", "ds", "db"), auto, (dv, dds, ddb)):
        assert np.array_equal(np.array(a), np.array(b)), name
    # Not vacuous: gradients pass for most weights and are stopped at the grid's ends.
    mask = np.array(dv) != 0
    assert 0.3 < mask.mean() < 0.95


def test_parked_layers_give_back_the_same_bytes(tmp_path):
    model = tiny_llama()
    layer = model.model.layers[0].mlp.down_proj
    original = np.array(layer.weight)
    with activation_store(True) as store:
        parked = ParkedLayers(store(), prefix="model.layers.0.")
        shell = parked.park("model.layers.0.mlp.down_proj", layer)
        assert list(parked) == ["mlp.down_proj"]
        assert shell.weight.shape == layer.weight.shape
        for _ in range(2):  # a fresh load each time
            assert np.array(parked["mlp.down_proj"].weight).tobytes() == original.tobytes()
        parked.close()
        assert len(parked) == 0


@pytest.mark.parametrize("method", ["signround", "scales"])
def test_learned_rounding_parked_gives_the_same_bytes(method):
    """The same block tuned with everything in memory and with its float layers, targets and
    grid positions in scratch files (what the pipeline does on a CPU): the same stored values
    and the same figures."""
    results = []
    for park in (False, True):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        with activation_store(park) as store:
            if park:
                layers = ParkedLayers(store())
                for path, m in ctx.float_layers.items():
                    layers.park(path, m)
                targets = store(targets)
                ctx = attrs.evolve(ctx, float_layers=layers, store=store)
            figures = LearnedRounding(method=method, steps=12, eval_every=3,
                                      batch_size=1).optimize(ctx, targets)
        assert figures["best_step"] > 0  # the tuned values are what is compared
        results.append((figures, _quantized_bytes(ctx.block)))
    assert results[0] == results[1]


def test_objective_measured_a_few_sequences_at_a_time_is_the_whole_batch_value():
    """On a CPU the objective's forward passes run ``batch_size`` sequences at a time (where
    this BLAS gives a product's row slices bit for bit): the figure is the whole batches' one,
    bit for bit."""
    figures = []
    for batch_size in (None, 1, 3):
        model = tiny_llama()
        tokens = mx.random.randint(0, 96, (4, 32), key=mx.random.key(1))
        ctx, targets = _quantized_block(model, LLAMA, tokens, bits=2)
        figures.append(LearnedRounding(steps=0, batch_size=batch_size).optimize(ctx, targets))
    assert figures[0]["loss_before"] > 0
    assert [f["loss_before"] for f in figures[1:]] == [figures[0]["loss_before"]] * 2
