"""GPTAQ vs GPTQ on one model: perplexity, time and peak memory at equal settings. Not a test.

    python benchmarks/gptaq.py --model /tmp/smollm2-135m --bits 4 3 --alphas 0.25 1.0

Every layer (the tied embedding / output head included) at the same bits and group size;
perplexity with quantized layers dequantized to float32. Peak memory is MLX's peak allocation
during quantization (``mx.get_peak_memory`` after a reset), which includes the model itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from quantkit import Recipe, perplexity, quantize_model
from quantkit.calibration import calibration_tokens
from quantkit.io import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/smollm2-135m")
    ap.add_argument("--calibration", default=str(SHARED / "text" / "jane_austen.txt"))
    ap.add_argument("--eval", default=str(SHARED / "text" / "wikitext2_test.raw"))
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.25])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptaq.json"))
    args = ap.parse_args()

    from mlx_lm.utils import dequantize_model

    _, tok, _ = load_model(args.model)
    calib = calibration_tokens(tok, args.calibration, args.num_samples, args.seq_len, seed=0)
    ev = calibration_tokens(tok, args.eval, args.eval_samples, 512, seed=0)
    runs = []
    for bits in args.bits:
        for strategy, options in [("gptq", {})] + [("gptaq", {"alpha": a}) for a in args.alphas]:
            model, _, _ = load_model(args.model)
            mx.eval(model.parameters())
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            result = quantize_model(model, calib, Recipe.uniform(strategy, bits, args.group_size,
                                                                 **options))
            seconds = time.perf_counter() - t0
            peak = mx.get_peak_memory() / 1e9
            errs = [r.hessian_error / r.rtn_hessian_error for r in result.report.layers
                    if r.hessian_error is not None and r.rtn_hessian_error]
            model = dequantize_model(model)
            model.set_dtype(mx.float32)
            row = {"strategy": strategy, **options, "bits": bits, "group_size": args.group_size,
                   "ppl": perplexity(model, ev, batch_size=4), "quantize_s": round(seconds, 1),
                   "peak_memory_gb": round(peak, 3),
                   "mean_hessian_error_vs_rtn": sum(errs) / len(errs)}
            runs.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
