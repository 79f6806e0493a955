"""Every expert calibrated (``--moe-calibrate-all-experts``) against routed-only calibration.

Not a test. Part ``ppl``: on ``stories260K-moe4`` and its ``--starve`` variant (built into a
temporary directory by ``../shared/tools/make_moe_fixture.py``), GPTQ 4-bit g32 (tied embedding
6-bit RTN, as ``benchmarks/moe.py``) calibrated on Tiny Shakespeare (first 64×256 windows) with
routed-only statistics (the default) and with every token sent through every expert; perplexity
on TinyStories (first 128×256 windows: no token there picks the starved expert either), quantization time, MLX peak memory, experts that fell
back for lack of tokens; also perplexity on WikiText-2 (first 128×256 windows), where some
tokens do reach the starved expert. Part ``shape``: a random-weight Qwen3-MoE model of the
Qwen3-30B-A3B shape (hidden 2048, 128 experts, top 8, expert width 768; ``--layers`` of its 48
decoder blocks): time and peak memory of both modes (random weights: no perplexity).

    python benchmarks/moe_all_experts.py                      # ppl part, CPU, ~2 min
    python benchmarks/moe_all_experts.py --parts shape --layers 2 --num-samples 32 --seq-len 512

Prints a table; writes JSON to ``benchmarks/results/moe_all_experts[_SUFFIX].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit import DEFAULT_REGISTRY, Recipe, perplexity, quantize_model  # noqa: E402
from quantkit.calibration import read_text, tokenize  # noqa: E402
from quantkit.experts import with_all_experts  # noqa: E402
from quantkit.io import load_model  # noqa: E402

SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
EVALS = {"tinystories": "tinystories_sample.txt", "wikitext2": "wikitext2_test.raw"}
MODES = {"routed only": DEFAULT_REGISTRY, "all experts": with_all_experts()}


def first_windows(ids: np.ndarray, n: int, seq_len: int) -> mx.array:
    n = min(n, len(ids) // seq_len)
    return mx.array(ids[: n * seq_len].reshape(n, seq_len))


def timed_quantize(model, tokens, recipe, registry):
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    result = quantize_model(model, tokens, recipe, registry=registry)
    return result.report, time.perf_counter() - t0, mx.get_peak_memory() / 1e6


def fallbacks(report) -> int:
    return sum(1 for r in report.layers if r.expert is not None)


def ppl_rows(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="moe-all-"))
    starved = tmp / "stories260K-moe4-starved"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_moe_fixture.py"),
                    str(SHARED / "models" / "stories260K-pad192"), str(starved), "--starve"],
                   check=True, capture_output=True)
    recipe = Recipe.from_dict({
        "default": {"strategy": "gptq", "bits": args.bits, "group_size": args.group_size},
        "rules": [{"match": "model.embed_tokens", "strategy": "rtn", "bits": 6, "group_size": 64}],
    })
    rows = []
    for name, path in (("stories260K-moe4", SHARED / "models" / "stories260K-moe4"),
                       ("stories260K-moe4 --starve", starved)):
        _, tokenizer, _ = load_model(path)
        cal = first_windows(tokenize(tokenizer, read_text(SHARED / "text" / "tinyshakespeare.txt")),
                            args.num_samples, args.seq_len)
        evs = {k: first_windows(tokenize(tokenizer, read_text(SHARED / "text" / f)),
                                args.eval_samples, args.seq_len)
               for k, f in EVALS.items()}
        model, _, _ = load_model(path)
        model.set_dtype(mx.float32)
        rows.append({"model": name, "mode": "float",
                     "ppl": {k: perplexity(model, ev) for k, ev in evs.items()}})
        for mode, registry in MODES.items():
            best = None
            for _ in range(args.repeats):
                model, _, _ = load_model(path)
                model.set_dtype(mx.float32)
                report, seconds, peak = timed_quantize(model, cal, recipe, registry)
                best = seconds if best is None else min(best, seconds)
            rows.append({"model": name, "mode": mode,
                         "ppl": {k: perplexity(model, ev) for k, ev in evs.items()},
                         "time_s": best, "peak_mb": peak, "fallback_experts": fallbacks(report)})
            print(rows[-1], flush=True)
    return rows


def shape_rows(args) -> list[dict]:
    import importlib

    module = importlib.import_module("mlx_lm.models.qwen3_moe")
    cfg = dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=args.layers,
        intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=40960,
        tie_word_embeddings=False, rope_theta=1e6, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True,
    )
    if args.smoke:  # the same code path at a size a CPU runs in seconds
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64,
                   vocab_size=1024, num_experts=16, moe_intermediate_size=128)
    tokens = mx.array(np.random.default_rng(0).integers(
        0, cfg["vocab_size"], (args.num_samples, args.seq_len)), dtype=mx.int32)
    recipe = Recipe.from_dict({"default": {"strategy": "gptq", "bits": 4, "group_size": 64},
                               "rules": [{"match": "lm_head", "strategy": "rtn"},
                                         {"match": "model.embed_tokens", "strategy": "rtn"}]})
    rows = []
    for mode, registry in MODES.items():
        mx.random.seed(0)
        model = module.Model(module.ModelArgs.from_dict(cfg))
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        report, seconds, peak = timed_quantize(model, tokens, recipe, registry)
        name = "smoke (scaled down)" if args.smoke else "Qwen3-30B-A3B shape"
        rows.append({"model": f"{name}, {args.layers} layers (random)", "mode": mode,
                     "time_s": seconds, "peak_mb": peak, "fallback_experts": fallbacks(report),
                     "device": str(mx.default_device())})
        print(rows[-1], flush=True)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=["ppl", "shape"], default=["ppl"])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks of the Qwen3 shape")
    ap.add_argument("--smoke", action="store_true", help="shape part at a tiny size (CPU check)")
    ap.add_argument("--repeats", type=int, default=2, help="timing: best of this many runs")
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    rows = []
    if "ppl" in args.parts:
        rows += ppl_rows(args)
    if "shape" in args.parts:
        rows += shape_rows(args)
    out = REPO / "benchmarks" / "results" / f"moe_all_experts{args.suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "rows": rows},
                              indent=2))
    print("\n| model | calibration | ppl " + " | ppl ".join(EVALS)
          + " | time s | peak MB | fallback experts |")
    print("|---|---|" + "---:|" * (len(EVALS) + 3))
    for r in rows:
        ppl = " | ".join(f"{r['ppl'][k]:.3f}" for k in EVALS) if "ppl" in r else \
            " | ".join("-" for _ in EVALS)
        t = f"{r['time_s']:.1f}" if "time_s" in r else "-"
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        print(f"| {r['model']} | {r['mode']} | {ppl} | {t} | {peak} | {r.get('fallback_experts', '-')} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
