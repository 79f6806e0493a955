"""Mix strategies per layer with a recipe (examples/mixed_recipe.toml), quantize in memory and
show what each layer got.

    python examples/mixed_recipe.py [MODEL_DIR] [--recipe FILE] [--text FILE]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from _common import parse_args

from quantkit import Recipe, calibration_tokens, load_model, quantize_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    args = parse_args(__doc__, **{"--recipe": {"type": Path, "default": HERE / "mixed_recipe.toml",
                                               "help": "recipe TOML file"}})
    recipe = Recipe.from_toml(args.recipe)
    model, tokenizer, _ = load_model(args.model_dir)
    tokens = calibration_tokens(tokenizer, args.text, num_samples=32, seq_len=128)
    result = quantize_model(model, tokens, recipe)

    for r in result.report.layers:
        rule = "default" if r.rule is None else f"rule {r.rule + 1}"
        what = (f"{r.strategy} {r.bits}-bit g{r.group_size}" if r.status != "skipped"
                else f"full precision ({r.reason})")
        print(f"{r.path:34s} {rule:8s} {what}")
    kinds = Counter(f"{r.strategy or 'skip'}:{r.bits or '-'}" for r in result.report.layers)
    print("layers per strategy:bits", dict(sorted(kinds.items())))
    # What mlx_lm.load will read back from config.json["quantization"]:
    print("layers that differ from the default:",
          sum(isinstance(v, (dict, bool)) for v in result.quantization.values()))


if __name__ == "__main__":
    main()
