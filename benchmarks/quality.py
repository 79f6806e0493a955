"""Quality benchmark: perplexity of quantkit's strategies against RTN and mlx-lm's GPTQ.

Not a test. For one model directory it quantizes with each method at each bit width, evaluates
perplexity on each evaluation text (quantized weights dequantized to float32, which gives the
same numbers as the quantized kernels up to float rounding, and is much faster on CPU), prints a
table and writes JSON to ``benchmarks/results/quality_<name>.json``.

Methods (every one with the same layer assignment: all decoder linears at ``--bits`` /
``--group-size``; the (tied) embedding at 8-bit RTN, since mlx-lm's GPTQ cannot calibrate it):

- ``float``      the unquantized model
- ``rtn``        MLX's round to nearest (``nn.quantize``'s arithmetic)
- ``mlx_gptq``   ``mlx_lm.quant.gptq.gptq_quantize`` (installed mlx-lm; 2/4/8 bits only)
- ``gptq``       quantkit GPTQ, defaults
- ``gptq_best``  quantkit GPTQ + act-order (static groups) + scale search (``--search``)

Example (SmolLM2-135M, converted first with ../shared/tools/gguf_to_mlx.py)::

    python benchmarks/quality.py /tmp/smollm2-135m --name smollm2-135m \\
        --eval wikitext2=../shared/text/wikitext2_test.raw --bits 4 3 2 --group-size 64 \\
        --compare-builtin
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit import Recipe, load_model, perplexity, quantize_model  # noqa: E402
from quantkit.calibration import calibration_tokens, make_batches, read_text, tokenize  # noqa: E402

SHARED = REPO.parent / "shared"
EMBED = "model.embed_tokens"


def dequantized(model: nn.Module) -> nn.Module:
    """Replace quantized linears/embeddings by float32 ones holding the dequantized weights."""
    swaps = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        w = mx.dequantize(
            m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
            mode=getattr(m, "mode", "affine"), dtype=mx.float32,
        )
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


def recipe(strategy: str, bits: int, group_size: int, **options) -> Recipe:
    return Recipe.from_dict({
        "default": {"strategy": strategy, "bits": bits, "group_size": group_size, **options},
        "rules": [{"match": EMBED, "strategy": "rtn", "bits": 8}],
    })


def run_method(method: str, model_dir: Path, tokens: mx.array, bits: int, group_size: int,
               search: str, damping: float = 0.01) -> tuple[nn.Module | None, float]:
    t0 = time.perf_counter()
    model, _, _ = load_model(model_dir)
    if method == "float":
        pass
    elif method == "mlx_gptq":
        if bits not in (2, 4, 8):
            return None, 0.0
        from mlx_lm.quant.gptq import gptq_quantize

        dtype = model.model.embed_tokens.weight.dtype
        model.set_dtype(mx.float32)  # same calibration precision as quantkit's walker
        gptq_quantize(model, tokens, bits, group_size, fallback_bits=8,
                      fallback_group_size=group_size)
        model.set_dtype(dtype)  # scales stored in the model's dtype, as quantkit stores them
    else:
        strategy, options = {
            "rtn": ("rtn", {}),
            "gptq": ("gptq", {"damping": damping}),
            "gptq_best": ("gptq", {"act_order": True, "scale_search": search, "damping": damping}),
        }[method]
        quantize_model(model, tokens, recipe(strategy, bits, group_size, **options))
    return dequantized(model), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", default=None, help="results file suffix (default: model dir name)")
    ap.add_argument("--calibration", default=str(SHARED / "text" / "jane_austen.txt"))
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                    help="evaluation text (repeatable); default wikitext2")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", nargs="+",
                    default=["float", "rtn", "mlx_gptq", "gptq", "gptq_best"])
    ap.add_argument("--search", default="hessian", choices=["mse", "hessian"],
                    help="scale search of gptq_best")
    ap.add_argument("--damping", type=float, default=0.01, help="quantkit GPTQ damping")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=40)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--calibrations", nargs="+", default=["jane_austen"],
                    choices=["jane_austen", "builtin"],
                    help="calibration set(s) for the methods (jane_austen = --calibration)")
    ap.add_argument("--compare-builtin", action="store_true",
                    help="after the main table, also run gptq and gptq_best calibrated on the "
                         "offline default text")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    name = args.name or args.model.name
    out = args.out or REPO / "benchmarks" / "results" / f"quality_{name}.json"
    evals = dict(e.split("=", 1) for e in args.eval) or {
        "wikitext2": str(SHARED / "text" / "wikitext2_test.raw")}
    _, tokenizer, _ = load_model(args.model)
    eval_tokens = {
        k: make_batches(tokenize(tokenizer, read_text(f)), args.eval_samples, args.eval_seq_len, 0)
        for k, f in evals.items()
    }
    sources = {"jane_austen": args.calibration, "builtin": "builtin"}
    names = list(dict.fromkeys(args.calibrations + (["builtin"] if args.compare_builtin else [])))
    calibrations = {k: sources[k] for k in names}
    cal_tokens = {k: calibration_tokens(tokenizer, src, args.num_samples, args.seq_len, seed=0)
                  for k, src in calibrations.items()}
    cal_tokens["-"] = cal_tokens[names[0]]  # float and rtn: unused

    settings = {
        "calibration": calibrations, "num_samples": args.num_samples, "seq_len": args.seq_len,
        "eval": evals, "eval_samples": args.eval_samples, "eval_seq_len": args.eval_seq_len,
        "group_size": args.group_size, "damping": args.damping, "gptq_best": {"act_order": True, "scale_search": args.search},
        "embedding": "8-bit RTN for every method", "evaluated": "dequantized to float32",
        "mlx": mx.__version__, "python": platform.python_version(),
    }
    jobs = [("float", "-", 16)] if "float" in args.methods else []
    for bits in args.bits:
        for cal in args.calibrations:
            jobs += [(m, cal if m != "rtn" else "-", bits) for m in args.methods
                     if m != "float" and (m != "rtn" or cal == args.calibrations[0])]
    if args.compare_builtin:  # after the main table, so a cut-short run still has it
        for bits in args.bits:
            jobs += [(m, "builtin", bits) for m in ("gptq", "gptq_best") if m in args.methods]
    header = f"{'method':<10} {'calib':<12} {'bits':>4} " + " ".join(f"{k:>10}" for k in evals)
    print(header + f" {'time_s':>7}", flush=True)
    rows = []
    for method, cal, bits in jobs:
        model, secs = run_method(method, args.model, cal_tokens[cal], bits, args.group_size,
                                 args.search, args.damping)
        ppl = ({k: perplexity(model, t) for k, t in eval_tokens.items()} if model is not None
               else {k: None for k in evals})
        rows.append({"method": method, "calibration": cal,
                     "bits": bits, "group_size": args.group_size, "perplexity": ppl,
                     "quantize_s": round(secs, 1)})
        cells = " ".join(f"{v:>10.3f}" if v is not None else f"{'n/a':>10}" for v in ppl.values())
        print(f"{method:<10} {rows[-1]['calibration']:<12} {bits:>4} {cells} {secs:>7.1f}", flush=True)
        del model
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(args.model), "name": name, "settings": settings,
                                   "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
