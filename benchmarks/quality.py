"""Quality benchmark: every quantization variant against RTN at identical per-layer settings.

Not a test. For each model and bit width it quantizes with each variant, then measures, on
held-out text (calibration and evaluation texts are different files), the perplexity and the
KL divergence to the float model (both from the logits of the two models on the same windows),
the quantization time and MLX's peak memory. Quantized weights are evaluated dequantized to
float32 (the same numbers as the quantized kernels up to float rounding; much faster on CPU).

Every variant quantizes every layer at ``--bits`` and the model's group size, as the plain
``quantkit quantize MODEL -o OUT --bits B --group-size G`` does: the tied embedding, which is
also the output head, included (quantkit calibrates it as the head; RTN and mlx-lm round it).

Protocols (issue 18):

- ``stories260K-pad192``, ``stories260K-moe4``: calibration Tiny Shakespeare 32×512 (seed 0),
  evaluation the first 16 windows of 512 tokens of the TinyStories sample, group 32.
- ``smollm2-135m``: calibration Jane Austen 32×512 (seed 0), evaluation the first 16 windows of
  512 tokens of WikiText-2, group 64. Convert it first:
  ``python ../shared/tools/gguf_to_mlx.py ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-135m``

Variants ``default`` and ``fast`` quantize with the recipe of a plain ``quantkit quantize`` and
of ``--fast``, built by :func:`quantkit.defaults.default_recipe` (the CLI's function); their
rows record that recipe. ``QUANTKIT_SHARED`` names the shared models/texts folder (default
``../shared``).

Results go to ``benchmarks/results/quality_<model>.json`` (rows of earlier runs with other
variants or bits are kept, so runs can be split with the filters); ``--render`` writes
the tables of ``docs/results-quality.md`` from those files.

    python benchmarks/quality.py --models stories260K-pad192 --bits 3
    python benchmarks/quality.py --models smollm2-135m --bits 3 4 --only rtn gptq awq_gptq_best
    python benchmarks/quality.py --render
    python benchmarks/quality.py --tied-head --bits 4   # SmolLM2's tied head alone, see TIED_HEAD
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit import Recipe, load_model  # noqa: E402
from quantkit.blocks.awq import ActivationAwareScaling  # noqa: E402
from quantkit.blocks.rounding import LearnedRounding  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.defaults import DEFAULT, default_recipe  # noqa: E402
from quantkit.walker import ModelWalker  # noqa: E402

SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"

MODELS = {
    "stories260K-pad192": {"path": SHARED / "models" / "stories260K-pad192",
                           "calibration": "tinyshakespeare.txt", "eval": "tinystories_sample.txt",
                           "group_size": 32},
    "stories260K-moe4": {"path": SHARED / "models" / "stories260K-moe4",
                         "calibration": "tinyshakespeare.txt", "eval": "tinystories_sample.txt",
                         "group_size": 32},
    "smollm2-135m": {"path": Path("/tmp/smollm2-135m"), "calibration": "jane_austen.txt",
                     "eval": "wikitext2_test.raw", "group_size": 64},
}

BEST = {"act_order": True, "scale_search": "hessian"}
#: variant → (strategy, strategy options, AWQ?, learned rounding method or None)
VARIANTS: dict[str, tuple[str, dict, bool, str | None]] = {
    "rtn": ("rtn", {}, False, None),
    "gptq": ("gptq", {}, False, None),
    "gptq_best": ("gptq", BEST, False, None),
    "awq_rtn": ("rtn", {}, True, None),
    "awq_gptq": ("gptq", {}, True, None),
    "awq_gptq_best": ("gptq", BEST, True, None),
    "gptq_best_lr": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_scales": ("gptq", BEST, False, "scales"),
    "awq_gptq_best_lr": ("gptq", BEST, True, "signround"),
    "gptq_best_lr_fm": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_head": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_fm_head": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_e8": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_e12": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_fm_e8": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_sf": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_sf_e8": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_lr2": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_sf_lr2": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_hd": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_hd1": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_head": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_hdp": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_d05": ("gptq", {**BEST, "damping": 0.05}, False, "signround"),
    "gptq_best_lr_td_e2": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td02": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_tda": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_d005": ("gptq", {**BEST, "damping": 0.005}, False, "signround"),
    "gptq_best_lr_td_d002": ("gptq", {**BEST, "damping": 0.002}, False, "signround"),
    "gptq_best_lr_tdh": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_hs": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_sw": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_hdp_sw": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_hdp_lrh": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrq": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_n1": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_n03": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_n01": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_tw": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_tw": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_b4": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_b1": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_kd": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_kd2": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_kd_lr3": ("gptq", BEST, False, "signround"),
    "gptq_best_lr_td_lrh_kd2_lr3": ("gptq", BEST, False, "signround"),
}
#: ``[embedding]`` table of a variant (the _hd rules' damping through the handler: the same
#: arrays, tests/test_recipe.py).
EMBEDDING: dict[str, dict] = {
    **{v: {"tied_damping": 0.1} for v in (
        "gptq_best_lr_td", "gptq_best_lr_td_head", "gptq_best_lr_td_d05", "gptq_best_lr_td_e2",
        "gptq_best_lr_td_d005", "gptq_best_lr_td_d002", "gptq_best_lr_td_lrh",
        "gptq_best_lr_td_hs", "gptq_best_lr_td_sw", "gptq_best_lr_td_lrq",
        "gptq_best_lr_td_lrh_n1", "gptq_best_lr_td_lrh_n03", "gptq_best_lr_td_lrh_n01",
        "gptq_best_lr_td_lrh_tw", "gptq_best_lr_td_tw", "gptq_best_lr_td_lrh_b4",
        "gptq_best_lr_td_lrh_b1", "gptq_best_lr_td_lrh_kd", "gptq_best_lr_td_lrh_kd2",
        "gptq_best_lr_td_lrh_kd_lr3", "gptq_best_lr_td_lrh_kd2_lr3")},
    "gptq_best_lr_td02": {"tied_damping": 0.2},
}
#: ``[moe]`` table of a variant: experts' Hessians blended with the layer's (λ = 16, the best of
#: benchmarks/moe.py's shrinkage sweep).
MOE: dict[str, dict] = {"gptq_best_lr_td_hs": {"hessian_shrinkage": 16.0}}
#: Recipe rules of a variant: the tied embedding / output head solved with other GPTQ options
#: than the other layers (more damping; act-order and the clipping search on or off).
HDP = [{"match": "model.embed_tokens", "act_order": False, "scale_search": "none", "damping": 0.1}]
RULES: dict[str, list[dict]] = {
    "gptq_best_lr_hd": [{"match": "model.embed_tokens", "damping": 0.1}],
    "gptq_best_lr_hd1": [{"match": "model.embed_tokens", "damping": 1.0}],
    # plain GPTQ for the tied head (no act-order, no clipping search), damping 0.1: the best
    # row of --tied-head
    "gptq_best_lr_hdp": HDP,
    "gptq_best_lr_hdp_sw": HDP,
    "gptq_best_lr_hdp_lrh": HDP,
    # the tied head with one of the default's options: act-order alone, the Hessian search alone
    "gptq_best_lr_tda": [{"match": "model.embed_tokens", "act_order": True,
                          "scale_search": "none", "damping": 0.1}],
    "gptq_best_lr_tdh": [{"match": "model.embed_tokens", "act_order": False,
                          "scale_search": "hessian", "damping": 0.1}],
}
#: Learned rounding options of a variant beyond its method, target and head (the class's
#: defaults otherwise; ``--lr-steps`` overrides the epochs).
LR_OPTIONS: dict[str, dict] = {
    "gptq_best_lr_e8": {"epochs": 8.0},
    "gptq_best_lr_td_e2": {"epochs": 2.0},
    "gptq_best_lr_e12": {"epochs": 12.0},
    "gptq_best_lr_fm_e8": {"epochs": 8.0},
    "gptq_best_lr_sf": {"start": "float"},
    "gptq_best_lr_sf_e8": {"start": "float", "epochs": 8.0},
    "gptq_best_lr_lr2": {"lr": 1 / 32},  # twice the default step at 64 steps (32 sequences)
    "gptq_best_lr_sf_lr2": {"start": "float", "lr": 1 / 32},
    # half the default step: 1/128 at 64 steps (32 sequences; the runs recorded before
    # lr_scale existed set lr = 1/128, the same value)
    "gptq_best_lr_td_lrh": {"lr_scale": 0.5},
    # steps scaled by sqrt(256 / inputs) for layers reading more than 256 inputs
    "gptq_best_lr_td_sw": {"step_width": 256},
    "gptq_best_lr_hdp_sw": {"step_width": 256},
    "gptq_best_lr_hdp_lrh": {"lr_scale": 0.5},
    "gptq_best_lr_td_lrq": {"lr_scale": 0.25},  # a quarter of the full step
    # the default with the blocks' norm weights tuned too, steps norm_step × the rounding's
    "gptq_best_lr_td_lrh_n1": {"lr_scale": 0.5, "norm_step": 1.0},
    "gptq_best_lr_td_lrh_n03": {"lr_scale": 0.5, "norm_step": 0.3},
    "gptq_best_lr_td_lrh_n01": {"lr_scale": 0.5, "norm_step": 0.1},
    # each output position's squared error relative to its target's mean square
    "gptq_best_lr_td_lrh_tw": {"lr_scale": 0.5, "weighting": "token"},
    "gptq_best_lr_td_tw": {"weighting": "token"},
    # the same passes in steps of 4 sequences (half as many steps) or of 1 (twice as many)
    "gptq_best_lr_td_lrh_b4": {"lr_scale": 0.5, "batch_size": 4},
    "gptq_best_lr_td_lrh_b1": {"lr_scale": 0.5, "batch_size": 1},
    **{v: {"lr_scale": 0.5} for v in ("gptq_best_lr_td_lrh_kd", "gptq_best_lr_td_lrh_kd2",
                                      "gptq_best_lr_td_lrh_kd_lr3", "gptq_best_lr_td_lrh_kd2_lr3")},
}
#: ``[distill]`` table of a variant: the default followed by end-to-end distillation of the
#: scales and biases (quantkit.pipeline.distill), one or two passes, Adam's lr 1e-5 or 3e-5.
DISTILL: dict[str, dict] = {
    "gptq_best_lr_td_lrh_kd": {},
    "gptq_best_lr_td_lrh_kd2": {"epochs": 2},
    "gptq_best_lr_td_lrh_kd_lr3": {"lr": 3e-5},
    "gptq_best_lr_td_lrh_kd2_lr3": {"epochs": 2, "lr": 3e-5},
}
#: Variants also run with the learned rounding's sequences drawn in other orders (its noise):
#: ``NAME_s1``, ``NAME_s2``, the same recipe with ``seed`` 1 and 2.
for _base in ("gptq_best_lr_td", "gptq_best_lr_hdp", "gptq_best_lr_td_lrh", "gptq_best_lr_td_sw",
              "gptq_best_lr_hdp_sw", "gptq_best_lr_hdp_lrh", "gptq_best_lr_td_lrq",
              "gptq_best_lr_td_lrh_n1", "gptq_best_lr_td_lrh_n03", "gptq_best_lr_td_lrh_n01",
              "gptq_best_lr_td_lrh_tw", "gptq_best_lr_td_tw", "gptq_best_lr_td_lrh_b1",
              "gptq_best_lr_td_lrh_kd"):
    for _seed in (1, 2):
        _name = f"{_base}_s{_seed}"
        VARIANTS[_name] = VARIANTS[_base]
        for _table in (EMBEDDING, RULES, DISTILL):
            if _base in _table:
                _table[_name] = _table[_base]  # type: ignore[index]
        LR_OPTIONS[_name] = {**LR_OPTIONS.get(_base, {}), "seed": _seed}
#: The recipes of a plain ``quantkit quantize`` and of ``--fast`` (quantkit.defaults), built by
#: the function the CLI uses, at the run's bits and group size; ``--lr-steps`` does not apply.
DEFAULTS = {"default": False, "fast": True}
MLX_LM = ("mlx_gptq", "mlx_awq", "mlx_dwq")
#: mlx-lm DWQ's own defaults (``mlx_lm.quant.dwq``: Adam, learning rate 1e-6, batch 4); it is
#: given the run's calibration windows for DWQ_EPOCHS passes (quantkit's learned rounding makes 4).
DWQ_LR, DWQ_BATCH, DWQ_EPOCHS = 1e-6, 4, 4


def dequantized(model: nn.Module) -> nn.Module:
    """Replace quantized linears/embeddings by float32 ones holding the dequantized weights."""
    swaps = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size,
                          bits=m.bits, mode=getattr(m, "mode", "affine"), dtype=mx.float32)
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(*w.shape)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                new.bias = m.bias
        new.weight = w
        swaps.append((path, new))
    model.update_modules(tree_unflatten(swaps))
    model.set_dtype(mx.float32)
    return model


def quantize(variant: str, model: nn.Module, tokens: mx.array, bits: int, group_size: int,
             lr_steps: int | None, awq_grid: int) -> bool:
    """Quantize ``model`` in place; ``False`` when the variant cannot run here."""
    if variant == "mlx_gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        if bits not in (2, 4, 8):
            return False
        dtype = model.model.embed_tokens.weight.dtype
        model.set_dtype(mx.float32)
        gptq_quantize(model, tokens, bits, group_size, fallback_bits=bits,
                      fallback_group_size=group_size)
        model.set_dtype(dtype)
        return True
    if variant == "mlx_awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        config = AWQ_MODEL_CONFIGS.get(getattr(model, "model_type", ""))
        if config is None:
            return False
        dtype = model.model.embed_tokens.weight.dtype
        model.set_dtype(mx.float32)
        awq_quantize(model, tokens, config, group_size=group_size, bits=bits,
                     embed_group_size=group_size, embed_bits=bits, n_grid=awq_grid)
        model.set_dtype(dtype)
        return True
    if variant == "mlx_dwq":
        return _mlx_dwq(model, tokens, bits, group_size)
    recipe = variant_recipe(variant, bits, group_size, lr_steps, awq_grid)
    ModelWalker(recipe=recipe).run(model, tokens)  # with its [distill] stage, if any
    return True


def _mlx_dwq(model: nn.Module, tokens: mx.array, bits: int, group_size: int) -> bool:
    """mlx-lm's DWQ: round to nearest with mlx-lm, then distil the float model's logits into the
    scales and biases (``dwq_quantize``) on the calibration windows. The float model is a copy of
    ``model`` taken before quantizing; validation windows are the first DWQ_BATCH windows."""

    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    dtype = model.model.embed_tokens.weight.dtype
    teacher = copy.deepcopy(model)
    quantize_model(model, {}, group_size=group_size, bits=bits)
    rows = [(tokens[i].tolist(), 0) for i in range(tokens.shape[0])]
    dwq_quantize(model, lambda batch, _i, split: teacher(batch),
                 optim.Adam(learning_rate=DWQ_LR, bias_correction=True), rows * DWQ_EPOCHS,
                 rows[:DWQ_BATCH], batch_size=DWQ_BATCH, max_seq_length=tokens.shape[1] + 1,
                 seed=0, dtype=dtype)
    model.eval()
    return True


def variant_recipe(variant: str, bits: int, group_size: int, lr_steps: int | None, awq_grid: int
                   ) -> Recipe:
    """The recipe quantkit quantizes with in ``variant`` (one of VARIANTS or DEFAULTS)."""
    if variant in DEFAULTS:  # exactly the CLI's: quantkit.defaults.default_recipe
        return default_recipe(fast=DEFAULTS[variant]).with_default(bits=bits, group_size=group_size)
    strategy, options, awq, lr = VARIANTS[variant]
    return attrs.evolve(
        Recipe.from_dict({"default": {"strategy": strategy, "bits": bits, "group_size": group_size,
                                      **options}, "rules": RULES.get(variant, []),
                          **({"embedding": EMBEDDING[variant]} if variant in EMBEDDING else {}),
                          **({"moe": MOE[variant]} if variant in MOE else {}),
                          **({"distill": DISTILL[variant]} if variant in DISTILL else {})}),
        transforms=(ActivationAwareScaling(n_grid=awq_grid),) if awq else (),
        optimizers=(LearnedRounding(method=lr, steps=lr_steps,
                                    target="float_model" if "_fm" in variant else "float_block",
                                    head=variant.endswith("_head"),
                                    **LR_OPTIONS.get(variant, {})),)
        if lr else (),  # None: epochs
    )


def evaluate(model: nn.Module, reference: nn.Module, windows: mx.array) -> tuple[float, float]:
    """``(perplexity of model, mean KL(reference ‖ model) per token)`` on ``windows``."""
    nll = kl = 0.0
    count = 0
    for i in range(windows.shape[0]):
        x = windows[i : i + 1]
        logq = nn.log_softmax(model(x[:, :-1]).astype(mx.float32), axis=-1)
        logp = nn.log_softmax(reference(x[:, :-1]).astype(mx.float32), axis=-1)
        step_nll = -mx.take_along_axis(logq, x[:, 1:, None], axis=-1).sum()
        step_kl = (mx.exp(logp) * (logp - logq)).sum()
        mx.eval(step_nll, step_kl)
        nll += step_nll.item()
        kl += step_kl.item()
        count += x.shape[1] - 1
    return math.exp(nll / count), kl / count


def run_model(name: str, args) -> None:
    spec = MODELS[name]
    path = Path(args.smollm2_dir) if name == "smollm2-135m" else spec["path"]
    if not path.exists():
        print(f"{name}: {path} is absent (see the module docstring); skipped")
        return
    reference, tokenizer, _ = load_model(path)
    reference.set_dtype(mx.float32)
    cal_ids = tokenize(tokenizer, read_text(SHARED / "text" / spec["calibration"]))
    calibration = make_batches(cal_ids, args.num_samples, args.seq_len, seed=0)
    eval_ids = tokenize(tokenizer, read_text(SHARED / "text" / spec["eval"]))
    n = args.eval_samples * args.eval_seq_len
    windows = mx.array(np.asarray(eval_ids[:n]).reshape(args.eval_samples, args.eval_seq_len))
    out = RESULTS / f"quality_{name}{'_' + args.tag if args.tag else ''}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = {_key(r): r for r in old.get("results", []) if "variant" in r}
    group_size = args.group_size or spec["group_size"]
    settings = {
        "model": name, "calibration": f"{spec['calibration']} {args.num_samples}x{args.seq_len} seed 0",
        "eval": f"{spec['eval']} first {args.eval_samples}x{args.eval_seq_len}",
        "group_size": spec["group_size"], "layers": "every layer at the given bits (embedding/head included)",
        "learned_rounding_steps": args.lr_steps, "awq_grid": args.awq_grid,
        "evaluated": "dequantized to float32", "mlx": mx.__version__,
        "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
    }
    if ("float", 16, None) not in rows:
        ppl, _ = evaluate(reference, reference, windows)
        rows[("float", 16, None)] = {"variant": "float", "bits": 16, "perplexity": ppl, "kl": 0.0}
    variants = args.only or [*VARIANTS, *DEFAULTS, *MLX_LM]
    for bits in args.bits:
        for variant in variants:
            model, _, _ = load_model(path)
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            ran = quantize(variant, model, calibration, bits, group_size, args.lr_steps,
                           args.awq_grid)
            secs = time.perf_counter() - t0
            peak = mx.get_peak_memory() / 1e9
            if not ran:
                print(f"{name:<20} {variant:<18} {bits}  (does not run here)", flush=True)
                continue
            if args.save_weights:  # for benchmarks/distill_saved.py
                Path(args.save_weights).mkdir(parents=True, exist_ok=True)
                mx.save_safetensors(str(Path(args.save_weights) / f"{name}_{variant}_{bits}b_g{group_size}"
                                        ".safetensors"), dict(tree_flatten(model.parameters())))
            ppl, kl = evaluate(dequantized(model), reference, windows)
            row = {"variant": variant, "bits": bits, "group_size": group_size, "perplexity": ppl,
                   "kl": kl, "time_s": round(secs, 1), "peak_gb": round(peak, 3)}
            if variant in DEFAULTS:  # what it ran: the default may change between runs
                row["recipe"] = variant_recipe(variant, bits, group_size, args.lr_steps,
                                               args.awq_grid).to_dict()
            rows[_key(row)] = row
            print(f"{name:<20} {variant:<18} {bits} g{group_size}  ppl {ppl:9.3f}  kl {kl:7.4f}  "
                  f"{secs:7.1f} s  {peak:6.3f} GB", flush=True)
            del model
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": settings, "results": list(rows.values())},
                                      indent=2))
    out.write_text(json.dumps({"settings": settings, "results": list(rows.values())}, indent=2))


def _steps(steps: int | None) -> str:
    if steps is None:
        lr = LearnedRounding()
        return f"{lr.epochs:g} passes over the calibration set, {lr.batch_size} sequences a step"
    return f"{steps} steps per block"


def _key(row: dict) -> tuple:
    return row["variant"], row["bits"], row.get("group_size")


def recovered(ppl: float, rtn: float, flt: float) -> float:
    """Fraction of RTN's perplexity increase over float that ``ppl`` removes."""
    return (rtn - ppl) / (rtn - flt) if rtn > flt else float("nan")


def grid_check(path: Path, out: Path) -> None:
    """How far 4-bit round to nearest moves each weight of ``path`` at groups of 32 and 64: the
    share of weights RTN returns exactly and the relative error ||W - Q(W)|| / ||W||, summed over
    the linear layers and the embedding. A model whose weights came from llama.cpp's Q4_1 (a
    4-bit grid per 32 weights) may be reproduced exactly at group 32."""
    model, _, _ = load_model(path)
    result = {}
    for g in (32, 64):
        same = total = 0
        err = energy = 0.0
        for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            if not isinstance(m, (nn.Linear, nn.Embedding)):
                continue
            w = m.weight.astype(mx.float32)
            q = mx.dequantize(*mx.quantize(w, group_size=g, bits=4), group_size=g, bits=4)
            q = q.astype(m.weight.dtype).astype(mx.float32)
            same += int(mx.sum(q == w).item())
            total += w.size
            err += float(mx.sum(mx.square(q - w)).item())
            energy += float(mx.sum(mx.square(w)).item())
        result[f"g{g}"] = {"exact_share": same / total, "relative_error": math.sqrt(err / energy)}
        print(f"4-bit RTN g{g}: {100 * same / total:.2f}% of weights exact, relative error "
              f"{math.sqrt(err / energy):.5f}", flush=True)
    out.write_text(json.dumps({"model": str(path), "grid_check": result}, indent=2))


def first_position(path: Path, samples: int, seq_len: int, out: Path) -> None:
    """Per decoder block of ``path`` (float32, calibration windows): the root mean square of the
    block's output at each window's first position against the median position's, that of the
    block's own contribution (output − input), and the first positions' share of the down
    projection's input energy (its GPTQ Hessian's trace)."""
    model, tokenizer, _ = load_model(path)
    model.set_dtype(mx.float32)
    ids = tokenize(tokenizer, read_text(SHARED / "text" / MODELS["smollm2-135m"]["calibration"]))
    h = model.model.embed_tokens(make_batches(ids, samples, seq_len, seed=0))
    rows = []
    for i, layer in enumerate(model.model.layers):
        r = h + layer.self_attn(layer.input_layernorm(h), "causal", None)
        y = layer.post_attention_layernorm(r)
        a = nn.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y)
        after = r + layer.mlp.down_proj(a)
        rms = np.sqrt(np.array(mx.mean(mx.square(after), axis=-1)))
        delta = np.sqrt(np.array(mx.mean(mx.square(after - h), axis=-1)))
        energy = np.array(mx.sum(mx.square(a), axis=-1))
        row = {"block": i, "rms_first": float(rms[:, 0].mean()), "rms_median": float(np.median(rms)),
               "delta_first": float(delta[:, 0].mean()), "delta_median": float(np.median(delta)),
               "down_input_share_first": float(energy[:, 0].sum() / energy.sum())}
        rows.append(row)
        print(f"block {i:2d}: output rms first {row['rms_first']:8.1f} median {row['rms_median']:6.2f}; "
              f"contribution first {row['delta_first']:7.2f} median {row['delta_median']:6.2f}; "
              f"down_proj input energy at first positions {100 * row['down_input_share_first']:5.1f}%",
              flush=True)
        h = after
    out.write_text(json.dumps({"model": str(path), "calibration": f"{samples}x{seq_len} seed 0",
                               "blocks": rows}, indent=2))


def rtn_split(path: Path, bits: int, group_size: int, eval_samples: int, seq_len: int,
              out: Path) -> None:
    """Where round to nearest's loss sits in ``path``: perplexity and KL to the float model with
    only the (tied) embedding/head rounded, with every other layer rounded, and with all of
    them (mlx's ``nn.quantize`` at ``bits``/``group_size``), on the first windows of the
    model's evaluation text."""
    reference, tokenizer, _ = load_model(path)
    reference.set_dtype(mx.float32)
    ids = tokenize(tokenizer, read_text(SHARED / "text" / MODELS["smollm2-135m"]["eval"]))
    windows = mx.array(np.asarray(ids[:eval_samples * seq_len]).reshape(eval_samples, seq_len))
    result = {"float": dict(zip(("perplexity", "kl"), evaluate(reference, reference, windows)))}
    for part in ("head_only", "all_but_head", "all"):
        model, _, _ = load_model(path)
        model.set_dtype(mx.float32)

        def chosen(name: str, m: nn.Module, part: str = part) -> bool:
            if not isinstance(m, (nn.Linear, nn.Embedding)):
                return False
            return part == "all" or (part == "head_only") == ("embed_tokens" in name)

        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=chosen)
        ppl, kl = evaluate(dequantized(model), reference, windows)
        result[part] = {"perplexity": ppl, "kl": kl}
        print(f"{bits}-bit RTN g{group_size}, {part:<12} ppl {ppl:9.3f}  kl {kl:.4f}", flush=True)
    out.write_text(json.dumps({"model": str(path), "bits": bits, "group_size": group_size,
                               "eval": f"first {eval_samples}x{seq_len}", "rtn_split": result},
                              indent=2))


#: ``--tied-head``: the tied embedding / head's strategy (None: round to nearest as the rest).
TIED_HEAD: dict[str, dict | None] = {
    "rtn": None, "gptq": {}, "gptq_best": BEST, "gptq_damping_0.1": {"damping": 0.1},
    "gptq_damping_1": {"damping": 1.0}, "gptq_best_damping_0.1": {**BEST, "damping": 0.1},
    # each option of BEST alone at damping 0.1, and the clipping search on plain squared error
    "gptq_act_order_damping_0.1": {"act_order": True, "damping": 0.1},
    "gptq_hessian_search_damping_0.1": {"scale_search": "hessian", "damping": 0.1},
    "gptq_mse_search_damping_0.1": {"scale_search": "mse", "damping": 0.1},
}


def tied_head(path: Path, bits: int, group_size: int, args, out: Path) -> None:
    """SmolLM2's tied embedding / output head solved in several ways while every other layer is
    rounded to nearest: what each way does to the head's share of the loss (calibration and
    evaluation as :func:`run_model`'s)."""
    reference, tokenizer, _ = load_model(path)
    reference.set_dtype(mx.float32)
    spec = MODELS["smollm2-135m"]
    calibration = make_batches(tokenize(tokenizer, read_text(SHARED / "text" / spec["calibration"])),
                               args.num_samples, args.seq_len, seed=0)
    ids = tokenize(tokenizer, read_text(SHARED / "text" / spec["eval"]))
    n = args.eval_samples * args.eval_seq_len
    windows = mx.array(np.asarray(ids[:n]).reshape(args.eval_samples, args.eval_seq_len))
    rows = {}
    for name, options in TIED_HEAD.items():
        rules = [] if options is None else [
            {"match": "model.embed_tokens", "strategy": "gptq", **options}]
        recipe = Recipe.from_dict({"default": {"strategy": "rtn", "bits": bits,
                                               "group_size": group_size}, "rules": rules})
        model, _, _ = load_model(path)
        t0 = time.perf_counter()
        ModelWalker(recipe=recipe).run(model, calibration)
        ppl, kl = evaluate(dequantized(model), reference, windows)
        rows[name] = {"perplexity": ppl, "kl": kl, "time_s": round(time.perf_counter() - t0, 1)}
        print(f"{bits}-bit g{group_size}, others RTN, tied head {name:<22} ppl {ppl:8.3f}  "
              f"kl {kl:.4f}", flush=True)
    out.write_text(json.dumps({"model": str(path), "bits": bits, "group_size": group_size,
                               "calibration": f"{spec['calibration']} {args.num_samples}x{args.seq_len} seed 0",
                               "eval": f"{spec['eval']} first {args.eval_samples}x{args.eval_seq_len}",
                               "tied_head": rows}, indent=2))


START, END = "<!-- quality.py --render: start -->", "<!-- quality.py --render: end -->"


def render(path: Path) -> None:
    """Rewrite the part of ``path`` between the START and END markers from the JSON files."""
    parts = []
    for name in MODELS:
        f = RESULTS / f"quality_{name}.json"
        if not f.exists():
            continue
        data = json.loads(f.read_text())
        s = data["settings"]
        rows = {_key(r): r for r in data["results"]}
        flt = rows.get(("float", 16, None))
        parts.append(f"\n### {name} (group {s['group_size']})\n\n"
                     f"Calibration {s['calibration']}; evaluation {s['eval']}; {s['layers']}; "
                     f"learned rounding in the *_lr variants: {_steps(s['learned_rounding_steps'])}"
                     f"; AWQ grid {s['awq_grid']} points."
                     + (f" Float perplexity {flt['perplexity']:.3f}.\n\n" if flt else "\n\n"))
        parts.append("| bits | group | variant | perplexity | KL to float | RTN loss recovered "
                     "| time (s) | peak (GB) |\n|---:|---:|---|---:|---:|---:|---:|---:|\n")
        cells = sorted({(b, g) for _, b, g in rows if b != 16},
                       key=lambda c: (-c[0], c[1] != s["group_size"], c[1]))
        for bits, g in cells:
            rtn = rows.get(("rtn", bits, g))
            order = [v for v in (*VARIANTS, *DEFAULTS, *MLX_LM) if (v, bits, g) in rows]
            for variant in order:
                r = rows[(variant, bits, g)]
                rec = ""
                if rtn and flt and variant != "rtn":
                    rec = f"{100 * recovered(r['perplexity'], rtn['perplexity'], flt['perplexity']):.0f}%"
                parts.append(f"| {bits} | {g} | {variant} | {r['perplexity']:.3f} | {r['kl']:.4f} | {rec} "
                             f"| {r.get('time_s', '')} | {r.get('peak_gb', '')} |\n")
        parts.append(f"\n(Machine: {s['machine']}, {s['cpu_count']} CPUs shared with other jobs; "
                     f"MLX {s['mlx']}. Times are of a loaded machine: compare them within a table.)\n")
    parts.append(_current_default())
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers; add them where the tables go")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + "\n" + "".join(parts) + "\n" + END + tail)


def _canonical(recipe: dict) -> tuple[dict, int]:
    """``recipe`` (``Recipe.to_dict()``) without its learned rounding's ``seed``, and the seed
    (the order of the calibration sequences, the run-to-run noise measured as such)."""
    recipe = json.loads(json.dumps(recipe))
    seed = 0
    for o in recipe.get("optimizer", []):
        seed = o.pop("seed", 0)
    return recipe, seed


def _current_default() -> str:
    """A table of every run on record of the recipe ``quantkit quantize`` runs today (rows of
    the ``default`` variant that recorded it, and named variants whose recipe is the same),
    per model, width and machine, with the mean over the learned rounding's orders and RTN
    measured on the same machine."""
    lines = []
    for name in MODELS:
        runs: dict[tuple, dict] = {}
        flt: dict[str, float | None] = {"CPU": None, "GPU": None}
        for f in sorted(RESULTS.glob(f"quality_{name}*.json")):
            data = json.loads(f.read_text())
            if "results" not in data:
                continue
            st = data["settings"]
            machine = "GPU" if "NVIDIA" in st.get("machine", "") else "CPU"
            for r in data["results"]:
                v, bits, g = r["variant"], r["bits"], r.get("group_size")
                if v == "float":
                    flt[machine] = flt[machine] or r["perplexity"]
                if bits == 16 or v in MLX_LM:
                    continue
                cell = runs.setdefault((bits, g, machine), {"runs": [], "rtn": None})
                if v == "rtn":
                    cell["rtn"] = r["perplexity"]
                    continue
                if v == "fast" or (v != "default" and v not in VARIANTS):
                    continue
                if v == "default":
                    if "recipe" not in r:
                        continue
                    recorded = r["recipe"]
                else:
                    recorded = variant_recipe(v, bits, g, st.get("learned_rounding_steps"),
                                              st.get("awq_grid", 20)).to_dict()
                today = default_recipe().with_default(bits=bits, group_size=g).to_dict()
                recipe, seed = _canonical(recorded)
                if st.get("learned_rounding_steps") is None and recipe == _canonical(today)[0]:
                    cell["runs"].append((seed, r["perplexity"], r["kl"], f.name))
        for (bits, g, machine), cell in sorted(runs.items(), key=lambda c: (-c[0][0], c[0][1], c[0][2])):
            if not cell["runs"]:
                continue
            ordered = sorted(cell["runs"])
            ppl = sum(r[1] for r in ordered) / len(ordered)
            kl = sum(r[2] for r in ordered) / len(ordered)
            rtn, base = cell["rtn"], flt[machine]
            rec = (f"{100 * recovered(ppl, rtn, base):.1f}%" if rtn and base else "(no RTN run here)")
            each = ", ".join(f"{p:.3f} ({k:.4f})" for _, p, k, _ in ordered)
            ratio = f"{ppl / base:.2f}×" if base else "–"
            lines.append(f"| {name} | {bits} | {g} | {machine} | {each} | **{ppl:.3f}** ({kl:.4f}) "
                         f"| {ratio} | {f'{rtn:.3f}' if rtn else '–'} | {rec} |\n")
    recipe = default_recipe().to_dict()
    head = ("\n### The default today, every run on record\n\n"
            f"`quantkit.defaults.DEFAULT` = `{DEFAULT}`: every row of the result files whose "
            "recipe is the one a plain `quantkit quantize --bits B` runs now (the learned "
            "rounding's order of sequences, `seed`, aside: each run of another order is listed), "
            "perplexity (KL to float); the mean over the orders, and RTN measured on the same "
            "kind of machine. Recipe (bits and group from the command): `"
            + json.dumps({k: v for k, v in recipe.items() if k != "default"} | {
                "default": {k: v for k, v in recipe["default"].items()
                            if k not in ("bits", "group_size")}}, sort_keys=True) + "`.\n\n"
            "| model | bits | group | machine | runs (perplexity, KL) | mean | mean ÷ float "
            "| RTN | RTN loss recovered |\n|---|---:|---:|---|---|---:|---:|---:|---:|\n")
    return head + "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 2])
    ap.add_argument("--save-weights", default=None, metavar="DIR",
                    help="save each quantized model's parameters to DIR/MODEL_VARIANT_Bb_gG.safetensors "
                         "(the input of benchmarks/distill_saved.py)")
    ap.add_argument("--only", nargs="+", choices=[*VARIANTS, *DEFAULTS, *MLX_LM], default=None,
                    help="variants to run (default: all)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="override the protocol's group size (rows are kept apart by it)")
    ap.add_argument("--smollm2-dir", default="/tmp/smollm2-135m")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--lr-steps", type=int, default=None,
                    help="learned rounding steps per block in the *_lr variants (default: the "
                         "class's, a number of passes over the calibration set)")
    ap.add_argument("--awq-grid", type=int, default=20, help="AWQ grid points")
    ap.add_argument("--tag", default=None,
                    help="write the rows to benchmarks/results/quality_<model>_<tag>.json (rows "
                         "of earlier runs there are kept) instead of quality_<model>.json, which "
                         "--render reads")
    ap.add_argument("--render", action="store_true", help="only write docs/results-quality.md")
    ap.add_argument("--grid-check", action="store_true",
                    help="only measure 4-bit RTN on SmolLM2's (Q4_1-derived) weights, g32 vs g64")
    ap.add_argument("--first-position", action="store_true",
                    help="only measure, per SmolLM2 block, how far the first position's hidden "
                         "state and MLP input stand out (on --num-samples calibration windows)")
    ap.add_argument("--rtn-split", action="store_true",
                    help="only measure SmolLM2's RTN loss with the embedding/head alone, the "
                         "other layers alone, and all rounded (at --bits, first of them)")
    ap.add_argument("--tied-head", action="store_true",
                    help="only measure SmolLM2 with the other layers rounded to nearest and its "
                         "tied embedding/head solved in each way of TIED_HEAD (at --bits, first)")
    args = ap.parse_args()
    if args.tied_head:
        tied_head(Path(args.smollm2_dir), args.bits[0], args.group_size or 64, args,
                  RESULTS / f"quality_smollm2-135m_tied_head_{args.bits[0]}bit.json")
        return
    if args.rtn_split:
        rtn_split(Path(args.smollm2_dir), args.bits[0], args.group_size or 64, args.eval_samples,
                  args.eval_seq_len, RESULTS / f"quality_smollm2-135m_rtn_split_{args.bits[0]}bit.json")
        return
    if args.first_position:
        first_position(Path(args.smollm2_dir), args.num_samples,
                       args.seq_len, RESULTS / "quality_smollm2-135m_first_position.json")
        return
    if args.grid_check:
        grid_check(Path(args.smollm2_dir), RESULTS / "quality_smollm2-135m_q41_grid.json")
        return
    if args.render:
        render(REPO / "docs" / "results-quality.md")
        return
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
