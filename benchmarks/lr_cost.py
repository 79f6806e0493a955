"""Learned rounding's cost against its quality: steps, sequences per step, passes.

Not a test. Quantizes stories260K-pad192 (protocol of ``benchmarks/quality.py``: calibration
Tiny Shakespeare 32×512 seed 0, evaluation the first 16×512 tokens of the TinyStories sample,
every layer at ``--bits`` g32) with GPTQ (act-order + Hessian scale search) followed by
``learned_rounding`` (``method = "scales"``) in each configuration given as JSON options of
:class:`~quantkit.blocks.rounding.LearnedRounding`, and prints perplexity, KL to float, the
run's time and its tuning phase; results are appended to ``benchmarks/results/lr_cost.json``.

    python benchmarks/lr_cost.py '{"steps": 40, "batch_size": null}' '{"steps": 40, "batch_size": 2}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs
import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import quality  # noqa: E402

from quantkit import Recipe, load_model  # noqa: E402
from quantkit.blocks.rounding import LearnedRounding  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.walker import ModelWalker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="JSON options of LearnedRounding")
    ap.add_argument("--bits", type=int, default=3)
    args = ap.parse_args()
    path = quality.SHARED / "models" / "stories260K-pad192"
    reference, tokenizer, _ = load_model(path)
    reference.set_dtype(mx.float32)
    text = quality.SHARED / "text"
    calibration = make_batches(tokenize(tokenizer, read_text(text / "tinyshakespeare.txt")),
                               32, 512, seed=0)
    ids = tokenize(tokenizer, read_text(text / "tinystories_sample.txt"))
    windows = mx.array(np.asarray(ids[:16 * 512]).reshape(16, 512))
    out = REPO / "benchmarks" / "results" / "lr_cost.json"
    rows = json.loads(out.read_text())["results"] if out.exists() else []
    for config in args.configs:
        options = json.loads(config)
        model, _, _ = load_model(path)
        recipe = attrs.evolve(Recipe.uniform("gptq", bits=args.bits, group_size=32, **quality.BEST),
                              optimizers=(LearnedRounding(**options),))
        t0 = time.perf_counter()
        report = ModelWalker(recipe=recipe).run(model, calibration).report
        secs = time.perf_counter() - t0
        ppl, kl = quality.evaluate(quality.dequantized(model), reference, windows)
        row = {"bits": args.bits, "options": options, "perplexity": ppl, "kl": kl,
               "time_s": round(secs, 1), "optimize_s": round(report.phases.get("optimize", 0.0), 1)}
        rows.append(row)
        print(f"{config:<45} ppl {ppl:7.3f}  kl {kl:.4f}  {secs:7.1f} s  (tuning "
              f"{row['optimize_s']} s)", flush=True)
        out.write_text(json.dumps({"model": "stories260K-pad192", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
