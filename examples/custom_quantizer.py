"""A custom Quantizer in a few lines, registered and used by a recipe for some layers while
the others use GPTQ.

``ClipRTN`` is round-to-nearest that shrinks each group's range when that lowers the group's
squared error (clipping outliers trades their error for finer steps everywhere else). It needs
no calibration, so it sets ``needs_hessian = False``; its attrs fields (``min_ratio``,
``steps``) become keys a recipe rule may set.

    python examples/custom_quantizer.py [MODEL_DIR] [--text FILE]
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import mlx.core as mx
from _common import parse_args

from quantkit import Quantizer, QuantResult, Recipe, quantize_model, register_strategy
from quantkit.calibration import calibration_tokens
from quantkit.io import load_model
from quantkit.kernels.rtn import affine_dequantize, affine_params_from_range, affine_quantize


@register_strategy
@attrs.frozen
class ClipRTN(Quantizer):
    name: ClassVar[str] = "clip_rtn"
    needs_hessian: ClassVar[bool] = False

    min_ratio: float = 0.8
    steps: int = 5

    def quantize(self, weight, spec, stats=None, storage_dtype=mx.float32):
        groups = weight.reshape(*weight.shape[:-1], -1, spec.group_size)
        lo, hi = groups.min(axis=-1), groups.max(axis=-1)
        best = None
        for i in range(self.steps):
            ratio = 1.0 - (1.0 - self.min_ratio) * i / max(self.steps - 1, 1)
            s, b = affine_params_from_range(lo * ratio, hi * ratio, spec.bits)
            s = s.astype(storage_dtype).astype(mx.float32)
            b = b.astype(storage_dtype).astype(mx.float32)
            codes = affine_quantize(weight, s, b, spec.bits)
            err = ((affine_dequantize(codes, s, b) - weight).reshape(groups.shape) ** 2).sum(-1)
            if best is None:
                best = (err, codes, s, b)
            else:
                better = err < best[0]
                per_value = mx.repeat(better, spec.group_size, axis=-1).reshape(weight.shape)
                best = (mx.minimum(err, best[0]), mx.where(per_value, codes, best[1]),
                        mx.where(better, s, best[2]), mx.where(better, b, best[3]))
        _, codes, scales, biases = best
        return QuantResult(spec=spec, dequantized=affine_dequantize(codes, scales, biases),
                           codes=codes, scales=scales, biases=biases)


RECIPE = {
    "default": {"strategy": "gptq", "bits": 4, "group_size": 32},
    "rules": [{"match": "*.mlp.*", "strategy": "clip_rtn", "min_ratio": 0.75}],
}


def main() -> None:
    args = parse_args(__doc__)
    from quantkit import perplexity

    model, tokenizer, _ = load_model(args.model_dir)
    tokens = calibration_tokens(tokenizer, args.text, num_samples=32, seq_len=128)
    held_out = calibration_tokens(tokenizer, args.text, num_samples=16, seq_len=128, seed=1)
    before = perplexity(model, held_out)
    result = quantize_model(model, tokens, Recipe.from_dict(RECIPE))
    for r in result.report.layers:
        if r.status != "skipped":
            print(f"{r.path:34s} {r.strategy}")
    print("layers per strategy:", result.report.strategy_counts())
    print(f"perplexity: float {before:.3f} -> mixed GPTQ + clip_rtn {perplexity(model, held_out):.3f}")


if __name__ == "__main__":
    main()
