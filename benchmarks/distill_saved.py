"""End-to-end distillation (``[distill]``, quantkit.pipeline.distill) of a quantized model that
``benchmarks/quality.py --save-weights DIR`` saved, measured with quality.py's protocol.

The quantized model is rebuilt from the float model (every linear and embedding at ``--bits`` /
``--group-size``, as quality.py's variants store them) and the saved parameters; its perplexity
and KL to the float model are measured on quality.py's evaluation windows before and after
:func:`quantkit.pipeline.distill.distill` runs on quality.py's calibration windows (the same
windows the saved model was calibrated on). Each row: the settings, the figures, the stage's own
calibration KL before/after and its time. One saved model serves several settings without
quantizing again (~30 min for SmolLM2-135M on one CPU thread)::

    OPENBLAS_NUM_THREADS=1 python benchmarks/quality.py --models smollm2-135m --bits 4 \\
        --only default --save-weights /tmp/qw --tag cpu_4bit_saved
    OPENBLAS_NUM_THREADS=1 python benchmarks/distill_saved.py --model smollm2-135m --bits 4 \\
        --weights /tmp/qw/smollm2-135m_default_4b_g64.safetensors --epochs 1 --lr 1e-5

JSON: ``benchmarks/results/distill_saved_<model>_<bits>b_g<group>[_tag].json`` (rows are added
to the file, keyed by their settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality as Q  # noqa: E402

from quantkit import load_model  # noqa: E402
from quantkit.calibration import make_batches, read_text, tokenize  # noqa: E402
from quantkit.pipeline.distill import Distillation, distill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(Q.MODELS), required=True)
    ap.add_argument("--smollm2-dir", default="/tmp/smollm2-135m")
    ap.add_argument("--weights", required=True, help="a file quality.py --save-weights wrote")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    spec = Q.MODELS[args.model]
    path = Path(args.smollm2_dir) if args.model == "smollm2-135m" else spec["path"]
    group = args.group_size or spec["group_size"]
    teacher, tokenizer, _ = load_model(path)
    teacher.set_dtype(mx.float32)
    student, _, _ = load_model(path)
    nn.quantize(student, group_size=group, bits=args.bits)
    student.load_weights(args.weights)
    calibration = make_batches(tokenize(tokenizer, read_text(Q.SHARED / "text" / spec["calibration"])),
                               args.num_samples, args.seq_len, seed=0)
    ids = tokenize(tokenizer, read_text(Q.SHARED / "text" / spec["eval"]))
    n = args.eval_samples * args.eval_seq_len
    windows = mx.array(np.asarray(ids[:n]).reshape(args.eval_samples, args.eval_seq_len))

    def figures() -> tuple[float, float]:
        return Q.evaluate(Q.dequantized(copy.deepcopy(student)), teacher, windows)

    ppl0, kl0 = figures()
    config = Distillation(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    inputs = calibration[:, :-1]
    done = distill(student, lambda idx: teacher(inputs[mx.array(idx)]), calibration, config)
    secs = time.perf_counter() - t0
    ppl1, kl1 = figures()
    row = {"weights": Path(args.weights).name, **attrs.asdict(config),
           "before": {"perplexity": ppl0, "kl": kl0}, "after": {"perplexity": ppl1, "kl": kl1},
           "stage": done.to_dict(), "time_s": round(secs, 1)}
    out = Q.RESULTS / f"distill_saved_{args.model}_{args.bits}b_g{group}{'_' + args.tag if args.tag else ''}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    key = (row["weights"], row["epochs"], row["lr"], row["batch_size"], row["seed"])
    rows = [r for r in old.get("results", [])
            if (r["weights"], r["epochs"], r["lr"], r["batch_size"], r["seed"]) != key] + [row]
    settings = {"model": args.model, "calibration": f"{spec['calibration']} {args.num_samples}x{args.seq_len} seed 0",
                "eval": f"{spec['eval']} first {args.eval_samples}x{args.eval_seq_len}", "bits": args.bits,
                "group_size": group, "mlx": mx.__version__, "machine": platform.platform()}
    Q.RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
    print(f"{args.model} {args.bits}b g{group} epochs {args.epochs} lr {args.lr:g} seed {args.seed}: "
          f"ppl {ppl0:.3f} -> {ppl1:.3f}  kl {kl0:.4f} -> {kl1:.4f}  "
          f"(calibration kl {done.kl_before:.4f} -> {done.kl_after:.4f}, kept {done.kept}, {secs:.0f} s)")


if __name__ == "__main__":
    main()
