"""Mixed precision at equal bits per weight: quantkit's planner vs mlx-lm's dynamic_quant vs
uniform widths, on one model. Not a test; writes JSON and a PNG curve into benchmarks/results/.

    python benchmarks/mixed_precision.py --model /tmp/smollm2-135m

Perplexity and the output KL(float ‖ quantized) (mean and 99th percentile per next-token
position, top-1 agreement; :func:`quantkit.evaluate.fidelity`) are measured on the evaluation
text with quantized layers dequantized to float32 (same values, faster on CPU). Bits per weight are mlx-lm's ``compute_bits_per_weight`` of the stored model: every
parameter byte (scales, biases, norms, embeddings, full-precision layers) over the number of
weights. Each section appends to the JSON as it finishes, so a partial run keeps its results.

Methods:
- ``uniform-rtn`` / ``uniform-gptq``: every layer (embedding included) at one (bits, group).
- ``quantkit-mixed``: :func:`quantkit.mixed.measure_sensitivity` once (Fisher-weighted GPTQ
  errors), then one plan per target, quantized with GPTQ; ``quantkit-mixed-kl`` /
  ``quantkit-mixed-kl-fast``: the same with the KL sensitivity (``--sensitivities``). When
  ``kl`` and another signal are measured in one run, their Spearman rank correlation is
  written to the JSON (``rank_correlation``).
- ``dynamic_quant``: mlx-lm's ``estimate_sensitivities`` + ``estimate_threshold`` on the same
  calibration tokens (no download), low/high = (b, 64)/(b+1, 64) around the target, quantized
  as mlx-lm does (round to nearest); ``dynamic_quant+gptq``: the same per-layer assignment
  quantized with quantkit's GPTQ (isolates the allocation from the rounding method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from quantkit import Recipe, perplexity, quantize_model
from quantkit.calibration import calibration_tokens
from quantkit.evaluate import fidelity
from quantkit.io import load_model
from quantkit.mixed import measure_sensitivity
from quantkit.specs import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", ROOT.parent / "shared"))
UNIFORM = [(2, 64), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (5, 64)]
CANDIDATES = [(2, 64), (3, 64), (3, 32), (4, 128), (4, 64), (4, 32), (5, 64), (6, 64)]


def evaluate(model, tokens, reference=None) -> dict:
    """Perplexity, and with a ``reference`` model the output KL to it and top-1 agreement."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    if reference is None:
        return {"ppl": perplexity(model, tokens, batch_size=4)}
    f = fidelity(model, reference, tokens, batch_size=4)
    return {"ppl": f.perplexity, "kl": f.kl_mean, "kl_p99": f.kl_p99, "top1": f.top1_agreement}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def spearman(a, b) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_agreement(sens, ref) -> dict:
    """Spearman correlation of two sensitivities: over every (layer, candidate) pair, and per
    candidate across layers (median), and of each layer's error reduction from the lowest to
    the next candidate (what the allocation trades)."""
    a = {(lo.path, s): e for lo in sens.layers for _, e, s in lo.options}
    b = {(lo.path, s): e for lo in ref.layers for _, e, s in lo.options}
    keys = sorted(set(a) & set(b), key=str)
    pooled = spearman([a[k] for k in keys], [b[k] for k in keys])
    per_spec = []
    for spec in sorted({k[1] for k in keys}, key=str):
        ks = [k for k in keys if k[1] == spec]
        if len(ks) > 2:
            per_spec.append(spearman([a[k] for k in ks], [b[k] for k in ks]))
    return {"pooled": pooled, "per_candidate_median": float(np.median(per_spec)),
            "per_candidate": per_spec, "pairs": len(keys)}


def bpw(model) -> float:
    from mlx_lm.utils import compute_bits_per_weight

    return float(compute_bits_per_weight(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/smollm2-135m")
    ap.add_argument("--calibration", default=str(SHARED / "text" / "jane_austen.txt"))
    ap.add_argument("--eval", default=str(SHARED / "text" / "wikitext2_test.raw"))
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--targets", type=float, nargs="+", default=[3.25, 3.75, 4.25, 4.75])
    ap.add_argument("--uniform", default=",".join(f"{b}:{g}" for b, g in UNIFORM))
    ap.add_argument("--uniform-strategies", default="gptq,rtn")
    ap.add_argument("--rtn-uniform", default="3:64,4:64", help="specs for uniform RTN")
    ap.add_argument("--dynamic-gptq", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--sensitivities", default="fisher", help="comma-separated: fisher, output, kl, kl-fast, kl-grad")
    ap.add_argument("--mixed-strategy", default="gptq",
                    help="strategy of the planned layers (rtn: compare with dynamic_quant's RTN)")
    ap.add_argument("--sections", default="float,uniform,mixed,dynamic",
                    help="run in this order; 'uniform=STRATEGY:b:g+b:g' runs some uniform specs "
                         "with one strategy (e.g. uniform=gptaq:3:64)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_precision"))
    args = ap.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    results["settings"] = {k: v for k, v in vars(args).items()}

    def record(method: str, target, model, t0: float, **extra) -> None:
        row = {"method": method, "target_bpw": target, "bpw": bpw(model), "ppl": None,
               "quantize_s": round(time.perf_counter() - t0, 1), **extra}
        row.update(evaluate(model, ev, reference))
        results["runs"] = [r for r in results["runs"]
                           if (r["method"], r["target_bpw"]) != (method, target)] + [row]
        json_path.write_text(json.dumps(results, indent=2))
        print(f"{method:22s} target {target!s:6s} bpw {row['bpw']:.3f} ppl {row['ppl']:.3f} "
              f"KL {row.get('kl', float('nan')):.4f} ({row['quantize_s']} s)", flush=True)

    model, tok, _ = load_model(args.model)
    reference, _, _ = load_model(args.model)
    reference.set_dtype(mx.float32)
    calib = calibration_tokens(tok, args.calibration, args.num_samples, args.seq_len, seed=0)
    ev = calibration_tokens(tok, args.eval, args.eval_samples, args.eval_seq_len, seed=0)
    sections = args.sections.split(",")

    def run_float():
        record("float", None, model, time.perf_counter())

    def run_uniform(strategies: str = args.uniform_strategies, only: str = ""):
        for strategy in strategies.split(","):
            specs = args.uniform if strategy != "rtn" else args.rtn_uniform
            for item in (only or specs).split(","):
                b, g = map(int, item.split(":"))
                model, _, _ = load_model(args.model)
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                quantize_model(model, calib, Recipe.uniform(strategy, b, g))
                record(f"uniform-{strategy}", f"{b}b g{g}", model, t0,
                       peak_memory_gb=mx.get_peak_memory() / 1e9)

    measured = {}

    def run_mixed():
        for sensitivity in args.sensitivities.split(","):
            method = "quantkit-mixed" + ("" if sensitivity == "fisher" else f"-{sensitivity}") \
                + ("" if args.mixed_strategy == "gptq" else f"-{args.mixed_strategy}")
            model, _, _ = load_model(args.model)
            t0 = time.perf_counter()
            sens = measure_sensitivity(
                model, calib, candidates=[QuantSpec(b, g) for b, g in CANDIDATES],
                recipe=Recipe.uniform(args.mixed_strategy),
                reference_bpw=4.0, fisher_samples=args.fisher_samples, sensitivity=sensitivity)
            measure_s = time.perf_counter() - t0
            print(f"sensitivity ({sensitivity}) measured in {measure_s:.0f} s", flush=True)
            results[f"{method}_measure_s"] = measure_s
            measured[sensitivity] = sens
            if "kl" in measured:
                results.setdefault("rank_correlation", {}).update({
                    f"{name} vs kl": rank_agreement(s, measured["kl"])
                    for name, s in measured.items() if name != "kl"})
                json_path.write_text(json.dumps(results, indent=2))
            for target in args.targets:
                plan = sens.plan(target)
                model, _, _ = load_model(args.model)
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                quantize_model(model, calib, plan.recipe)
                (out.parent / f"{out.name}_{method}_{target:g}.toml").write_text(plan.to_toml())
                spread: dict[str, int] = {}
                for s in plan.specs.values():
                    key = f"{s.bits}b g{s.group_size}"
                    spread[key] = spread.get(key, 0) + 1
                record(method, target, model, t0, planned_bpw=plan.bits_per_weight,
                       spread=spread, peak_memory_gb=mx.get_peak_memory() / 1e9)

    def run_dynamic():
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
        from mlx_lm.utils import quantize_model as mlx_quantize

        cache: dict[int, dict[str, float]] = {}
        for target in args.targets:
            low = max(2, min(7, math.floor(target - 0.5 + 1e-9)))
            high = low + 1 if low + 1 != 7 else 8
            if low not in cache:
                fmodel, _, _ = load_model(args.model)
                fmodel.set_dtype(mx.float32)  # float16 matmuls have no BLAS on CPU
                mx.random.seed(0)
                t0 = time.perf_counter()
                cache[low] = dict(estimate_sensitivities(fmodel, calib, low, 64, high, 64, batch_size=4))
                print(f"dynamic_quant sensitivities {low}/{high} bits: {time.perf_counter() - t0:.0f} s",
                      flush=True)
                del fmodel
            sens_d = cache[low]
            model, _, config = load_model(args.model)
            t0 = time.perf_counter()
            threshold = estimate_threshold(model, sens_d, target, low, 64, high, 64)
            high_layers = sorted(p for p, v in sens_d.items() if v > threshold)

            def predicate(p, m, high=high, high_layers=high_layers):
                if not hasattr(m, "to_quantized"):
                    return False
                return {"bits": high, "group_size": 64} if p in high_layers else True

            mlx_quantize(model, config, 64, low, quant_predicate=predicate)
            record("dynamic_quant", target, model, t0, low=low, high=high, n_high=len(high_layers))
            if not args.dynamic_gptq:
                continue
            model, _, _ = load_model(args.model)
            t0 = time.perf_counter()
            recipe = Recipe.from_dict({
                "default": {"strategy": "gptq", "bits": low, "group_size": 64},
                "rules": [{"match": p, "bits": high} for p in high_layers],
            })
            quantize_model(model, calib, recipe)
            record("dynamic_quant+gptq", target, model, t0, low=low, high=high)

    steps = {"float": run_float, "uniform": run_uniform, "mixed": run_mixed,
             "dynamic": run_dynamic}
    for name in sections:
        # "uniform=gptq:3:32+3:64" runs one strategy at some specs, in this order
        if name.startswith("recipe="):
            # "recipe=METHOD@FILE.toml@STRATEGY": quantize with a saved plan, strategy replaced
            method, path, strategy = name.split("=", 1)[1].split("@")
            model, _, _ = load_model(args.model)
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            quantize_model(model, calib, Recipe.from_toml(path).with_default(strategy=strategy))
            record(method, args.targets[0], model, t0, recipe=path,
                   peak_memory_gb=mx.get_peak_memory() / 1e9)
        elif "=" in name:
            strategy, _, specs = name.split("=")[1].partition(":")
            run_uniform(strategy, specs.replace("+", ","))
        else:
            steps[name]()

    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(results))
    print(table(results))


def table(results) -> str:
    """The runs as a markdown table, by bits per weight."""
    lines = ["| method | target | bits per weight | perplexity | KL mean | KL p99 | top-1 agree "
             "| quantize s | detail |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (r["bpw"], r["method"]), reverse=True):
        detail = r.get("spread") or ({"low": r["low"], "high": r["high"], "n_high": r.get("n_high")}
                                     if "low" in r else "")
        lines.append(f"| {r['method']} | {r['target_bpw'] if r['target_bpw'] is not None else ''} "
                     f"| {r['bpw']:.3f} | {r['ppl']:.2f} | {_f(r.get('kl'), '.4f')} "
                     f"| {_f(r.get('kl_p99'), '.3f')} | {_f(r.get('top1'), '.3f')} "
                     f"| {r['quantize_s']} | {detail} |")
    return "\n".join(lines) + "\n"


def _f(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = results["runs"]
    floats = [r for r in runs if r["method"] == "float"]
    styles = {"uniform-rtn": "s:", "uniform-gptq": "o--", "uniform-gptaq": "x", "quantkit-mixed": "D-",
              "quantkit-mixed-output": "d:", "quantkit-mixed-rtn": "P-",
              "quantkit-mixed-kl": "h-", "quantkit-mixed-kl-fast": "H--",
              "quantkit-mixed-kl-rtn": "p-", "quantkit-mixed-kl-fast-rtn": "X--",
              "quantkit-mixed-rtn-plan+gptq": "*",
              "dynamic_quant": "^:", "dynamic_quant+gptq": "v-."}
    for method, style in styles.items():
        rows = sorted((r["bpw"], r["ppl"], r["target_bpw"]) for r in runs if r["method"] == method)
        if not rows:
            continue
        xs, ys, labels = zip(*rows)
        if method.startswith("uniform"):  # one point per spec, several specs share a cost
            ax.plot(xs, ys, style.rstrip(":-."), label=method)
            for x, y, label in rows:
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            ax.plot(xs, ys, style, label=method)
    if floats:
        ax.axhline(floats[0]["ppl"], color="gray", lw=0.8, label="float")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (mlx-lm compute_bits_per_weight)")
    ax.set_ylabel(f"perplexity on {Path(results['settings']['eval']).name}")
    ax.set_title(Path(results["settings"]["model"]).name + ": perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
