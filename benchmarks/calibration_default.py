"""Which offline default calibration text? Perplexity after GPTQ calibrated on each candidate.

Not a test. For each model, quantizes with quantkit GPTQ (decoder linears at ``--bits`` /
``--group-size``, the tied embedding at 8-bit RTN as in ``benchmarks/quality.py``) calibrated on
each candidate text, then measures perplexity (dequantized to float32) on held-out texts that no
candidate contains. Prints a table, writes ``benchmarks/results/calibration_default.json``.

Candidates: ``builtin-pydoc`` (CPython's ``pydoc_data.topics``, the default until this
measurement), ``builtin-austen`` (the packaged 360 KB of *Pride and Prejudice*, the default
since), the first half of the TinyStories sample (the second half is an evaluation text), Tiny
Shakespeare, Jane Austen's six novels, and any ``--extra NAME=SPEC`` (``--calibration`` values,
``;``-separated for a mixture). ``--only NAME`` restricts the run to some candidates.

Example (as run for docs/calibration.md; SmolLM2 converted first with
../shared/tools/gguf_to_mlx.py)::

    python benchmarks/calibration_default.py pad192=../shared/models/stories260K-pad192:3:32 \\
        --num-samples 32 --seq-len 256 --eval-samples 32 --seeds 3 \\
        --extra "builtin+austen=builtin-pydoc:0.5;PP150KB:0.5" --out .../calibration_default_pad192.json
    python benchmarks/calibration_default.py smollm2=/tmp/smollm2-135m:3:64 \\
        --num-samples 32 --seq-len 256 --eval-samples 16 --out .../calibration_default_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import dequantized, recipe  # noqa: E402

from quantkit import load_model, perplexity, quantize_model  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.data import load_calibration  # noqa: E402
from quantkit.host import HostLinear, host_attention  # noqa: E402
from quantkit.registry import Wrapper  # noqa: E402

SHARED = REPO.parent / "shared"


class _HostHead(Wrapper):
    """A tied embedding whose output-head product runs in NumPy (the biggest matmul)."""

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module)
        w = module.weight.astype(mx.float32)
        mx.eval(w)
        self._weight_t = np.asarray(w).T

    def __call__(self, x):
        return self.module(x)

    def as_linear(self, x):
        rows = np.asarray(x.astype(mx.float32).reshape(-1, x.shape[-1]))
        return mx.array(rows @ self._weight_t).reshape(*x.shape[:-1], -1)


def host_ppl(model: nn.Module, evals: dict) -> dict[str, float]:
    """Perplexity with the float32 linear layers, attention and tied head computed by NumPy
    (MLX's Linux CPU wheel multiplies with reference BLAS; same numbers to float32 rounding)."""
    swaps = [(k, HostLinear(m)) for k, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
             if type(m) is nn.Linear]
    embed = model.model.embed_tokens
    if type(embed) is nn.Embedding:
        swaps.append(("model.embed_tokens", _HostHead(embed)))
    model.update_modules(tree_unflatten(swaps))
    with host_attention(model):
        return {k: perplexity(model, t) for k, t in evals.items()}


def candidates(tmp: Path, extra: list[str]) -> dict[str, list[str]]:
    stories = read_text(SHARED / "text" / "tinystories_sample.txt")
    first = tmp / "tinystories_first_half.txt"
    first.write_text(stories[: len(stories) // 2])
    out = {
        "builtin-pydoc (CPython docs)": ["builtin-pydoc"],
        "builtin-austen (360 KB, the default)": ["builtin-austen"],
        "tinystories (1st half)": [str(first)],
        "tinyshakespeare": [str(SHARED / "text" / "tinyshakespeare.txt")],
        "jane_austen": [str(SHARED / "text" / "jane_austen.txt")],
    }
    for item in extra:
        name, _, spec = item.partition("=")
        out[name] = spec.split(";")
    return out


def eval_texts(tmp: Path) -> dict[str, str]:
    stories = read_text(SHARED / "text" / "tinystories_sample.txt")
    second = tmp / "tinystories_second_half.txt"
    second.write_text(stories[len(stories) // 2 :])
    return {"wikitext2": str(SHARED / "text" / "wikitext2_test.raw"), "tinystories-2nd": str(second)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=DIR:BITS:GROUP")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=1, help="calibration seeds to average over")
    ap.add_argument("--extra", action="append", default=[], help="NAME=SPEC[;SPEC...]")
    ap.add_argument("--only", action="append", default=[], help="run only these candidates")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "calibration_default.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="calib-default-"))
    cands = candidates(tmp, args.extra)
    if args.only:
        cands = {k: v for k, v in cands.items() if k in args.only}
    evals = eval_texts(tmp)
    rows = []
    for item in args.models:
        name, _, rest = item.partition("=")
        model_dir, bits, group = rest.rsplit(":", 2)
        _, tokenizer, _ = load_model(model_dir)
        eval_tokens = {k: make_batches(tokenize(tokenizer, read_text(v)), args.eval_samples,
                                       args.seq_len, seed=1) for k, v in evals.items()}
        model, _, _ = load_model(model_dir)
        model.set_dtype(mx.float32)
        base = host_ppl(model, eval_tokens)
        rows.append({"model": name, "calibration": "float (unquantized)", **base})
        print(f"{name}: float {base}", flush=True)
        for cname, spec in cands.items():
            runs = []
            for seed in range(args.seeds):
                model, _, _ = load_model(model_dir)
                data = load_calibration(tokenizer, spec, args.num_samples, args.seq_len, seed=seed)
                t0 = time.perf_counter()
                quantize_model(model, data.tokens, recipe("gptq", int(bits), int(group)))
                seconds = time.perf_counter() - t0
                runs.append(host_ppl(dequantized(model), eval_tokens))
                print(f"{name}: {cname} seed {seed}: {runs[-1]} ({seconds:.1f} s)", flush=True)
            ppl = {k: float(np.mean([r[k] for r in runs])) for k in evals}
            rows.append({"model": name, "calibration": cname, "spec": spec, **ppl,
                         "per_seed": runs, "bits": int(bits), "group_size": int(group)})
    result = {
        "machine": platform.platform(), "processor": platform.processor(),
        "calibration": f"{args.num_samples}x{args.seq_len} tokens, seeds 0..{args.seeds - 1} "
                       "(perplexities are the mean over seeds)",
        "evaluation": f"{args.eval_samples}x{args.seq_len} tokens, seed 1: " + ", ".join(evals),
        "embedding": "8-bit RTN", "evaluated": "dequantized to float32", "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print()
    print(f"| model | calibration | {' | '.join(evals)} |")
    print("|---|---|" + "---:|" * len(evals))
    for r in rows:
        print(f"| {r['model']} | {r['calibration']} | "
              + " | ".join(f"{r[k]:.3f}" for k in evals) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
