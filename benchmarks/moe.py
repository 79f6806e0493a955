"""MoE benchmark (not a test): one Hessian shared by all experts (mlx-lm's way) against one
Hessian per expert, on ``../shared/models/stories260K-moe4``.

Part 1, perplexity (4-bit, group 32 by default; calibration tinyshakespeare 64×256, evaluation
tinystories 128×256, first windows, as in the shared README): the float model; mlx-lm's
``gptq_quantize`` (shared Hessian, every Hessian from the float model, its fallback layer — the
tied embedding — round to nearest at 6-bit group 64, mlx-lm's default); quantkit with the same
embedding rule and ``SwitchLinearHandler(shared_hessian=True)``; quantkit per-expert (the
default). The two quantkit rows differ only in the expert layers' Hessians.

Part 2, per-expert ``w2`` error: for every block's down projection, GPTQ of each expert with
its own Hessian and with the shared one, both measured with the expert's own Hessian (the mean
squared output error the expert makes on its own tokens), relative to the expert's output
energy.

Part 3 (``--sweep``), expert batches: a random Qwen3-MoE-shaped block (128 experts, top 8,
hidden 512) quantized with several ``expert_batch_size`` values: time and MLX peak memory.

    python benchmarks/moe.py                                  # reference protocol, ~5 min CPU
    python benchmarks/moe.py --num-samples 8 --eval-samples 16 --parts ppl sweep --json moe.json
    python benchmarks/moe.py --num-samples 8 --parts ppl --shrinkage 16 64 256 1024  # λ sweep

Prints tables; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402

from quantkit import (  # noqa: E402
    DEFAULT_REGISTRY,
    GPTQQuantizer,
    QuantSpec,
    Recipe,
    perplexity,
    quantize_model,
)
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.hessian import PerExpertHessianCollector  # noqa: E402
from quantkit.io import load_model  # noqa: E402
from quantkit.registry import SwitchLinearCatcher, SwitchLinearHandler  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def windows(ids: np.ndarray, n: int, seq_len: int, how: str) -> mx.array:
    if how == "random":
        return make_batches(ids, n, seq_len, seed=0)
    n = min(n, len(ids) // seq_len)
    return mx.array(ids[: n * seq_len].reshape(n, seq_len))


def fresh(path: Path):
    model, _, _ = load_model(path)
    model.set_dtype(mx.float32)
    return model


def registry(**options):
    reg = DEFAULT_REGISTRY.copy()
    reg.register(SwitchLinear, SwitchLinearHandler(**options))
    return reg


def timed(fn):
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, mx.get_peak_memory() / 1e6


def perplexity_rows(args, path, cal, ev) -> list[dict]:
    from mlx_lm.quant.gptq import gptq_quantize

    # mlx-lm's GPTQ does nn.Linear and SwitchLinear; its "fallback" layers (here the tied
    # embedding, also the output head) get round to nearest at --fallback-bits/-group-size.
    # quantkit gets the same rule, so only the treatment of the GPTQ layers differs.
    recipe = Recipe.from_dict({
        "default": {"strategy": "gptq", "bits": args.bits, "group_size": args.group_size},
        "rules": [{"match": "model.embed_tokens", "strategy": "rtn",
                   "bits": args.fallback_bits, "group_size": args.fallback_group_size}],
    })
    rows = []
    model = fresh(path)
    rows.append({"method": "float", "ppl": perplexity(model, ev), "time_s": 0.0})
    model = fresh(path)
    _, t, mem = timed(lambda: gptq_quantize(model, cal, args.bits, args.group_size,
                                            args.fallback_bits, args.fallback_group_size))
    rows.append({"method": "mlx-lm gptq_quantize (shared H)", "ppl": perplexity(model, ev),
                 "time_s": t, "peak_mb": mem})
    variants = [("quantkit, shared H", registry(shared_hessian=True)),
                ("quantkit, per-expert H", registry())]
    variants += [(f"quantkit, per-expert H, shrinkage {lam:g}", registry(hessian_shrinkage=lam))
                 for lam in args.shrinkage]
    for name, reg in variants:
        model = fresh(path)
        _, t, mem = timed(lambda m=model, r=reg: quantize_model(m, cal, recipe, registry=r))
        rows.append({"method": name, "ppl": perplexity(model, ev), "time_s": t, "peak_mb": mem})
    return rows


class _Both:
    def __init__(self, *collectors):
        self.collectors = collectors

    def update(self, x, indices):
        for c in self.collectors:
            c.update(x, indices)


def w2_rows(args, path, cal) -> list[dict]:
    model = fresh(path)
    spec, gptq = QuantSpec(bits=args.bits, group_size=args.group_size), GPTQQuantizer()
    rows = []
    for block, layer in enumerate(model.model.layers):
        key = f"model.layers.{block}.block_sparse_moe.switch_mlp.down_proj"
        w2 = layer.block_sparse_moe.switch_mlp.down_proj
        n_exp, _, dim = w2.weight.shape
        own = PerExpertHessianCollector(dim, n_exp)
        shared = PerExpertHessianCollector(dim, n_exp, shared=True)
        model.update_modules(tree_unflatten([(key, SwitchLinearCatcher(w2, _Both(own, shared)))]))
        for i in range(0, len(cal), 8):
            model(cal[i : i + 8])
            mx.eval(own.arrays(), shared.arrays())
        model.update_modules(tree_unflatten([(key, w2)]))
        s_own, s_shared = own.stats(), shared.stats()
        for e in range(n_exp):
            w = np.asarray(w2.weight[e], dtype=np.float64)
            h = np.asarray(s_own.h[e], dtype=np.float64)
            energy = float(np.einsum("ij,ij->", w @ h, w))

            def rel(stats, w=w, h=h, energy=energy, e=e, w2=w2):
                w_hat = gptq.quantize(w2.weight[e], spec, stats).dequantized
                d = w - np.asarray(w_hat, dtype=np.float64)
                return float(np.einsum("ij,ij->", d @ h, d)) / energy

            rows.append({"block": block, "expert": e, "tokens": s_own.expert_tokens[e],
                         "own": rel(s_own.expert(e)), "shared": rel(s_shared.expert(e))})
    return rows


def sweep_rows(args) -> list[dict]:
    import importlib

    module = importlib.import_module("mlx_lm.models.qwen3_moe")
    cfg = dict(
        model_type="qwen3_moe", hidden_size=256, num_hidden_layers=1, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_theta=1e6, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=128, norm_topk_prob=True,
    )
    tokens = mx.array(np.random.default_rng(0).integers(0, 1024, (4, 256)), dtype=mx.int32)
    recipe = Recipe.uniform(bits=4, group_size=64, block_size=64)
    rows = []
    for batch in args.sweep_batches:
        mx.random.seed(0)
        model = module.Model(module.ModelArgs.from_dict(cfg))
        mx.eval(model.parameters())
        _, t, mem = timed(lambda m=model, b=batch: quantize_model(
            m, tokens, recipe, registry=registry(expert_batch_size=b)))
        hessian_mb = min(batch, 128) * (2 * 256**2 + 128**2) * 4 / 1e6  # gate, up, down
        rows.append({"expert_batch_size": batch, "passes": -(-128 // batch), "time_s": t,
                     "peak_mb": mem, "hessians_held_mb_upper": hessian_mb})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K-moe4")
    ap.add_argument("--calibration", type=Path, default=SHARED / "text" / "tinyshakespeare.txt")
    ap.add_argument("--eval-text", type=Path, default=SHARED / "text" / "tinystories_sample.txt")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--fallback-bits", type=int, default=6,
                    help="the tied embedding, round to nearest (mlx-lm's gptq default: 6)")
    ap.add_argument("--fallback-group-size", type=int, default=64)
    ap.add_argument("--parts", nargs="+", choices=["ppl", "w2", "sweep"], default=["ppl", "w2"],
                    help="sweep: time a 128-expert block at several expert batch sizes")
    ap.add_argument("--sweep-batches", type=int, nargs="+", default=[128, 32, 8])
    ap.add_argument("--windows", choices=["first", "random"], default="first",
                    help="first: the texts' first windows (the shared README's protocol); "
                         "random: quantkit's calibration sampling, seed 0")
    ap.add_argument("--shrinkage", type=float, nargs="*", default=[],
                    help="also per-expert Hessians shrunk towards the shared one with each λ")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    _, tokenizer, _ = load_model(args.model)
    cal = windows(tokenize(tokenizer, read_text(args.calibration)), args.num_samples,
                  args.seq_len, args.windows)
    ev = windows(tokenize(tokenizer, read_text(args.eval_text)), args.eval_samples,
                 args.seq_len, args.windows)
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": platform.platform(), "mlx": mx.__version__}

    if "ppl" in args.parts:
        print_perplexity(args, out, cal, ev)
    if "w2" in args.parts:
        print_w2(args, out, cal)
    if "sweep" in args.parts:
        print_sweep(args, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def print_perplexity(args, out, cal, ev) -> None:
    out["perplexity"] = perplexity_rows(args, args.model, cal, ev)
    print(f"\nstories260K-moe4, {args.bits}-bit g{args.group_size} (embedding RTN "
          f"{args.fallback_bits}-bit g{args.fallback_group_size}), calibration "
          f"{args.calibration.name} {len(cal)}x{args.seq_len}, eval {args.eval_text.name} "
          f"{len(ev)}x{args.seq_len}")
    print(f"{'method':34s} {'ppl':>8s} {'time s':>8s}")
    for r in out["perplexity"]:
        print(f"{r['method']:34s} {r['ppl']:8.3f} {r['time_s']:8.1f}")


def print_w2(args, out, cal) -> None:
    out["w2"] = w2_rows(args, args.model, cal)
    print("\nper-expert w2 GPTQ, relative Hessian-weighted error (own H of the expert)")
    print(f"{'block':>5s} {'expert':>6s} {'tokens':>7s} {'shared H':>9s} {'own H':>9s} {'ratio':>6s}")
    for r in out["w2"]:
        print(f"{r['block']:5d} {r['expert']:6d} {r['tokens']:7d} {r['shared']:9.5f} "
              f"{r['own']:9.5f} {r['shared'] / r['own']:6.2f}")
    ratios = [r["shared"] / r["own"] for r in out["w2"]]
    out["w2_summary"] = {"geomean_shared_over_own": float(np.exp(np.mean(np.log(ratios)))),
                         "experts_own_better": sum(x > 1 for x in ratios), "experts": len(ratios)}
    print(f"geometric mean shared/own: {out['w2_summary']['geomean_shared_over_own']:.2f}; "
          f"own H better on {out['w2_summary']['experts_own_better']}/{len(ratios)} experts")


def print_sweep(args, out) -> None:
    out["sweep"] = sweep_rows(args)
    print("\nexpert batches: random Qwen3-MoE block, 128 experts top 8, hidden 256, "
          "expert width 128, 4x256 tokens")
    print(f"{'batch':>6s} {'passes':>6s} {'time s':>8s} {'MLX peak MB':>12s} {'Hessians MB':>12s}")
    for r in out["sweep"]:
        print(f"{r['expert_batch_size']:6d} {r['passes']:6d} {r['time_s']:8.1f} "
              f"{r['peak_mb']:12.1f} {r['hessians_held_mb_upper']:12.1f}")


if __name__ == "__main__":
    main()
