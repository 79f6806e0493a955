"""Evaluate: perplexity of the float model and of its RTN and GPTQ 4-bit versions, each loaded
back from disk with mlx_lm.load (what mlx_lm.generate / mlx_lm.server would run).

    python examples/evaluate.py [MODEL_DIR] [--text FILE]

The same number from the shell: ``quantkit eval MODEL_DIR --text FILE``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import parse_args
from mlx_lm import load

from quantkit import Recipe, perplexity, quantize_directory
from quantkit.calibration import make_batches, read_text, tokenize


def main() -> None:
    args = parse_args(__doc__)
    print(f"text: {args.text or 'built-in'}")
    with tempfile.TemporaryDirectory(prefix="quantkit-eval-") as tmp:
        dirs = {"float": args.model_dir}
        for strategy in ("rtn", "gptq"):
            dirs[strategy] = quantize_directory(
                args.model_dir, Path(tmp) / strategy, Recipe.uniform(strategy, bits=4, group_size=32),
                calibration=args.text, num_samples=16, seq_len=128, seed=0,
            ).out_dir

        _, tokenizer = load(str(args.model_dir))
        ids = tokenize(tokenizer, read_text(args.text))
        # Evaluate on the second half of the text: windows calibration is unlikely to have seen.
        held_out = make_batches(ids[len(ids) // 2:], num_samples=16, seq_len=128, seed=1)
        for name, path in dirs.items():
            model, _ = load(str(path))
            print(f"{name:6s} perplexity {perplexity(model, held_out):8.3f}")


if __name__ == "__main__":
    main()
