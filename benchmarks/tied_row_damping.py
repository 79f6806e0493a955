"""Why does damping 0.1 help SmolLM2's tied embedding / head? (not a test)

The default recipe solves a tied embedding with GPTQ damping 0.1 (``[embedding] tied_damping``,
docs/results-quality.md). One reading: the matrix's rows are also looked up as input
embeddings, where a row's plain squared error counts in proportion to how often its token
occurs, and the damping's identity term stands for that use. If so, damping each row in
proportion to its token's count in the calibration text should do at least as well as one
damping for every row. This script measures both, on SmolLM2-135M with every other layer
rounded to nearest (as ``quality.py --tied-head``): the tied matrix's Hessian is taken from
the hidden states of that model (float head), each row ``v`` gets damping
``max(alpha · count_v / mean count, 0.01)`` snapped to the nearest of ``0.01 · 4^k`` (one
factorization per level), and the model is evaluated as in ``quality.py``.

    OPENBLAS_NUM_THREADS=1 python benchmarks/tied_row_damping.py [--bits 4] [--alphas 0.03 0.1 0.3]

Prints a table; writes benchmarks/results/tied_row_damping_<bits>bit.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import MODELS, RESULTS, SHARED, dequantized, evaluate  # noqa: E402

from quantkit import Recipe, load_model  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.hessian import HessianStats  # noqa: E402
from quantkit.quantizers import GPTQQuantizer  # noqa: E402
from quantkit.specs import QuantSpec  # noqa: E402
from quantkit.walker import ModelWalker  # noqa: E402

LEVELS = np.array([0.01 * 4**k for k in range(8)])


def row_dampings(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Each row's damping: ``alpha`` times its token's count over the mean count, at least 0.01,
    snapped (in log scale) to the nearest of :data:`LEVELS`."""
    d = np.maximum(alpha * counts / counts.mean(), 0.01)
    return LEVELS[np.abs(np.log(d)[:, None] - np.log(LEVELS)[None]).argmin(1)]


def solve_rows(w: mx.array, stats: HessianStats, spec: QuantSpec, dampings: np.ndarray) -> mx.array:
    """``w`` quantized by plain GPTQ, each row with its own damping (rows are independent)."""
    out = mx.zeros(w.shape, dtype=mx.float32)
    for d in np.unique(dampings):
        rows = mx.array(np.nonzero(dampings == d)[0])
        out[rows] = GPTQQuantizer(damping=float(d)).quantize(w[rows], spec, stats).dequantized
    mx.eval(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    ap.add_argument("--smollm2-dir", default=str(MODELS["smollm2-135m"]["path"]))
    args = ap.parse_args()
    info = MODELS["smollm2-135m"]
    path, group_size = Path(args.smollm2_dir), info["group_size"]
    spec = QuantSpec(bits=args.bits, group_size=group_size)
    reference, tokenizer, _ = load_model(path)
    reference.set_dtype(mx.float32)
    calibration = make_batches(tokenize(tokenizer, read_text(SHARED / "text" / info["calibration"])),
                               32, 512, seed=0)
    ids = tokenize(tokenizer, read_text(SHARED / "text" / info["eval"]))
    windows = mx.array(np.asarray(ids[: 16 * 512]).reshape(16, 512))
    model, _, _ = load_model(path)
    ModelWalker(recipe=Recipe.from_dict({"default": {"strategy": "rtn", "bits": args.bits,
                                                     "group_size": group_size}})).run(model, calibration)
    model = dequantized(model)
    w = reference.model.embed_tokens.weight.astype(mx.float32)
    model.model.embed_tokens.weight = w  # the hidden states of the others-RTN model, float head
    h, n = mx.zeros((w.shape[1], w.shape[1])), 0
    for b in range(0, calibration.shape[0], 4):
        x = model.model(calibration[b : b + 4]).reshape(-1, w.shape[1]).astype(mx.float32)
        h, n = h + x.T @ x, n + x.shape[0]
        mx.eval(h)
    stats = HessianStats(h=h / n, n_tokens=n)
    counts = np.bincount(np.array(calibration).ravel(), minlength=w.shape[0]).astype(np.float64)
    cases = {"every row 0.1": np.full(w.shape[0], 0.1)}
    cases.update({f"by token count, alpha {a:g}": row_dampings(counts, a) for a in args.alphas})
    rows = {}
    print(f"SmolLM2-135M {args.bits}-bit g{group_size}, others RTN; tied embedding/head damping:")
    print(f"| {'damping':<28} | perplexity | KL | rows at 0.01 |")
    print("|---|---:|---:|---:|")
    for name, dampings in cases.items():
        model.model.embed_tokens.weight = solve_rows(w, stats, spec, dampings)
        ppl, kl = evaluate(model, reference, windows)
        rows[name] = {"perplexity": ppl, "kl": kl, "rows_at_0.01": int((dampings == 0.01).sum()),
                      "levels": {f"{d:g}": int(c) for d, c in zip(*np.unique(dampings, return_counts=True))}}
        print(f"| {name:<28} | {ppl:10.3f} | {kl:.4f} | {rows[name]['rows_at_0.01']} |", flush=True)
    out = RESULTS / f"tied_row_damping_{args.bits}bit.json"
    out.write_text(json.dumps({
        "model": str(path), "bits": args.bits, "group_size": group_size,
        "calibration": f"{info['calibration']} 32x512 seed 0", "eval": f"{info['eval']} first 16x512",
        "machine": platform.platform(), "mlx": mx.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
