"""What end-to-end distillation (``[distill]``, part of the default pipeline) adds to the whole
``quantkit quantize`` job (not a test): the CLI on a random-weight model directory of one of
speed.py's shapes, with ``--fast`` (the per-layer solve only) and with ``--fast --distill`` (the
same walk, then the streamed stage), in one run: wall seconds, the ``distill`` phase, the
stage's calibration KL before/after, the MLX peak (on a GPU, device memory) and the process's
max RSS, against the float model's size.

    source .devwhl/setup.sh .devwhl && python benchmarks/distill_cost.py --model qwen3-0.6b \\
        --samples 128 --seq-len 512                                     # the GPU machine
    OPENBLAS_NUM_THREADS=1 python benchmarks/distill_cost.py            # tiny-llama, CPU

Prints a table; writes benchmarks/results/distill_cost_<model>_<samples>x<seq-len>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from job import MODELS, cli_job, save_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.batch_size, args.strategy = None, "default"  # cli_job's other settings: the CLI's own
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantkit-distill-cost-") as tmp:
        model_dir = Path(tmp) / "model"
        size_gb = save_dir(model_dir, args.model, args.layers, args.dtype, 0)
        for name, extra in (("--fast", ["--fast"]), ("--fast --distill", ["--fast", "--distill"])):
            r = cli_job(model_dir, Path(tmp) / "out", args, *extra, "--no-checkpoint")
            rows.append({"run": name, **r})
    print(f"{args.model} ({args.layers or 'all'} blocks, {args.dtype}, {size_gb:.2f} GB), "
          f"{args.samples}×{args.seq_len} tokens, {args.bits}-bit g{args.group_size}, {device}")
    print(f"{'run':18s} {'wall s':>7s} {'distill s':>9s} {'MLX peak GB':>11s} {'max RSS GB':>10s}")
    for r in rows:
        print(f"{r['run']:18s} {r['wall_s']:7.1f} {r['phases_s'].get('distill', 0.0):9.1f} "
              f"{r['peak_memory_gb'] or 0:11.2f} {r['children_max_rss_gb']:10.2f}")
    result = {"model": args.model, "layers": args.layers, "dtype": args.dtype, "model_gb": size_gb,
              "samples": args.samples, "seq_len": args.seq_len, "bits": args.bits,
              "group_size": args.group_size, "device": device, "rows": rows,
              "machine": platform.platform(), "mlx": mx.__version__}
    out = args.json or REPO / "benchmarks" / "results" / \
        f"distill_cost_{args.model}_{args.samples}x{args.seq_len}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
