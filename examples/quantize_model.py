"""Quantize a model from Python: GPTQ 4-bit into a directory mlx_lm.load reads, then generate.

    python examples/quantize_model.py [MODEL_DIR] [--out DIR] [--text FILE]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import parse_args
from mlx_lm import generate, load

from quantkit import Recipe, quantize_directory


def main() -> None:
    args = parse_args(__doc__, **{"--out": {"type": Path, "default": None,
                                            "help": "output directory (default: a temporary one)"}})
    with tempfile.TemporaryDirectory(prefix="quantkit-example-") as tmp:
        run(args.model_dir, args.out or Path(tmp) / "q4", args.text)


def run(model_dir: Path, out: Path, text: Path | None) -> None:
    result = quantize_directory(
        model_dir, out, Recipe.uniform("gptq", bits=4, group_size=32),
        calibration=text, num_samples=32, seq_len=128, overwrite=True,
    )
    report = result.report
    print(f"wrote {result.out_dir}: {report.bits_per_weight:.2f} bits per weight, "
          f"{report.time_s:.1f} s, layers per strategy {report.strategy_counts()}")
    for r in report.by_status("skipped"):
        print(f"  kept in full precision: {r.path} ({r.reason})")

    model, tokenizer = load(str(result.out_dir))
    prompt = "Once upon a time"
    print(prompt + generate(model, tokenizer, prompt, max_tokens=24, verbose=False))


if __name__ == "__main__":
    main()
