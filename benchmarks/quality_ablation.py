"""Ablation of the quality options on one small model (not a test).

Calibrates on the first half of the TinyStories sample (64 x 256 tokens), evaluates on the
second half (64 x 256), group 32, tied embedding kept in full precision, and prints perplexity
and the summed Hessian-weighted error of every layer for RTN / GPTQ with each option.

    python benchmarks/quality_ablation.py ../shared/models/stories260K-pad192 4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantkit import Recipe, load_model, perplexity, quantize_model  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402

CONFIGS = [
    ("rtn", {}), ("rtn", {"scale_search": "mse"}), ("rtn", {"scale_search": "hessian"}),
    ("gptq", {}), ("gptq", {"scale_search": "mse"}), ("gptq", {"scale_search": "hessian"}),
    ("gptq", {"static_groups": True}), ("gptq", {"static_groups": True, "scale_search": "hessian"}),
    ("gptq", {"act_order": True}), ("gptq", {"act_order": True, "scale_search": "mse"}),
    ("gptq", {"act_order": True, "scale_search": "hessian"}),
]


def main() -> None:
    model_dir, bits = Path(sys.argv[1]), int(sys.argv[2])
    text = REPO.parent / "shared" / "text" / "tinystories_sample.txt"
    _, tokenizer, _ = load_model(model_dir)
    ids = tokenize(tokenizer, read_text(text))
    half = len(ids) // 2
    cal, ev = make_batches(ids[:half], 64, 256, 0), make_batches(ids[half:], 64, 256, 1)
    model, _, _ = load_model(model_dir)
    print(f"float ppl {perplexity(model, ev):.3f}")
    for strategy, options in CONFIGS:
        model, _, _ = load_model(model_dir)
        t0 = time.perf_counter()
        recipe = Recipe.from_dict({
            "default": {"strategy": strategy, "bits": bits, "group_size": 32, **options},
            "rules": [{"match": "model.embed_tokens", "strategy": "skip"}],
        })
        report = quantize_model(model, cal, recipe).report
        herr = sum(r.hessian_error or 0.0 for r in report.layers)
        print(f"{strategy:<5} {str(options):<50} ppl {perplexity(model, ev):7.3f} "
              f"hessian error {herr:8.4g}  {time.perf_counter() - t0:5.1f}s", flush=True)


if __name__ == "__main__":
    main()
