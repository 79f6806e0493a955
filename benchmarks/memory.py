"""Peak memory of the whole ``quantkit quantize`` job (not a test): a float32 random llama
written to disk, quantized by the CLI under ``/usr/bin/time -v``; max RSS against the model's
size. Target (issue 17): max RSS ≤ 35% of the float model on a 16-block ~0.8 GB model.

The model: mlx-lm ``llama`` ``ModelArgs`` with hidden 1024, 16 blocks, MLP 3072, vocab 512,
16 heads, untied head (0.84 GB float32), the stories260K tokenizer. Calibration: 32×256 tokens
of the TinyStories sample by default (the activations of the default 128×512 alone take
268 MB at hidden 1024). Rows: the import floor (what the program imports before its work: ``quantkit.cli``,
``quantkit.api``, mlx-lm's llama model; not transformers, see :mod:`quantkit.mlxlm`),
the default run (checkpointing on) and ``--no-checkpoint`` (the checkpoint's time cost is
their ratio, target ≤ 1.10×); ``--baseline DIR`` adds the same runs with another checkout's
code (e.g. main before streaming).

    OPENBLAS_NUM_THREADS=1 python benchmarks/memory.py [--blocks 16] [--baseline /work/main]
        [--strategy default] [--only-defaults] [--distill]

Needs GNU time (``apt-get install -y time``). Prints a table; writes
benchmarks/results/memory_<blocks>blocks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
TIME = "/usr/bin/time"


def build_model(path: Path, blocks: int, hidden: int, mlp: int, vocab: int, dtype: str) -> int:
    """A random llama saved as an mlx-lm model directory; returns its weights' bytes."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    config = {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": blocks,
        "intermediate_size": mlp, "num_attention_heads": 16, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "tie_word_embeddings": False,
        "max_position_embeddings": 2048, "rope_theta": 10000.0,
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    path.mkdir(parents=True)
    save_model(path, model, donate_model=True)
    save_config(config, config_path=path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "models" / "stories260K" / name, path / name)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def timed(cmd: list[str], code: Path) -> dict[str, float]:
    """Run ``cmd`` under GNU time with ``code`` first on PYTHONPATH: wall seconds, max RSS."""
    env = dict(os.environ, PYTHONPATH=str(code), OPENBLAS_NUM_THREADS=os.environ.get(
        "OPENBLAS_NUM_THREADS", "1"))
    start = time.perf_counter()
    # cwd=code: ``python -m`` puts the working directory first on sys.path.
    proc = subprocess.run([TIME, "-v", *cmd], env=env, cwd=code, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert rss is not None, proc.stderr[-2000:]
    return {"wall_s": wall, "max_rss_mb": int(rss.group(1)) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--strategy", default="gptq",
                        help="--strategy of the CLI runs; 'default': none, the default pipeline "
                             "(learned rounding after the solve)")
    parser.add_argument("--distill", action="store_true",
                        help="add --distill to the CLI runs (e.g. with --strategy rtn: the "
                             "end-to-end distillation's own peak after a walk that needs little)")
    parser.add_argument("--baseline", type=Path, help="another checkout to run the same job with")
    parser.add_argument("--only-defaults", action="store_true",
                        help="skip the --no-checkpoint run (a long job's memory figure only)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing: apt-get install -y time")
    py = sys.executable
    text = SHARED / "text" / "tinystories_sample.txt"
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantkit-memory-") as tmp:
        model = Path(tmp) / "model"
        size = build_model(model, args.blocks, args.hidden, args.mlp, args.vocab, args.dtype)
        floor = timed([py, "-c", "from quantkit import mlxlm; mlxlm.defer_package_init(); "
                           "import quantkit.cli, quantkit.api, mlx_lm.models.llama"], REPO)
        rows.append({"run": "import floor", "code": str(REPO), **floor})
        codes = [("this", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        for label, code in codes:
            for extra in ([], ["--no-checkpoint"]) if label == "this" and not args.only_defaults \
                    else ([],):
                out = Path(tmp) / f"out-{label}-{len(extra)}"
                cmd = [py, "-m", "quantkit.cli", "quantize", str(model), "-o", str(out),
                       "--calibration", str(text), "--num-samples", str(args.num_samples),
                       "--seq-len", str(args.seq_len), "-q", *extra,
                       *(["--strategy", args.strategy] if args.strategy != "default" else []),
                       *(["--distill"] if args.distill else [])]
                r = timed(cmd, code)
                rows.append({"run": f"{label} quantize {' '.join(extra) or '(defaults)'}",
                             "code": str(code), **r})
                shutil.rmtree(out, ignore_errors=True)
    print(f"float model: {args.blocks} blocks, hidden {args.hidden}, MLP {args.mlp}, "
          f"{args.dtype}: {size / 1e9:.3f} GB; calibration {args.num_samples}×{args.seq_len}")
    print(f"{'run':44s} {'wall s':>8s} {'max RSS MB':>11s} {'RSS / model':>12s}")
    for r in rows:
        r["rss_ratio"] = r["max_rss_mb"] * 2**20 / size
        print(f"{r['run']:44s} {r['wall_s']:8.1f} {r['max_rss_mb']:11.0f} {r['rss_ratio']:11.1%}")
    this = [r for r in rows if r["run"].startswith("this quantize")]
    ratio = this[0]["wall_s"] / this[1]["wall_s"] if len(this) > 1 else None
    if ratio is not None:
        print(f"checkpoint cost: defaults / --no-checkpoint = {ratio:.3f}x (target ≤ 1.10x)")
    result = {
        "model_bytes": size, "blocks": args.blocks, "hidden": args.hidden, "mlp": args.mlp,
        "vocab": args.vocab, "dtype": args.dtype, "num_samples": args.num_samples,
        "seq_len": args.seq_len, "strategy": args.strategy, "distill": args.distill, "rows": rows,
        "checkpoint_time_ratio": ratio, "machine": platform.platform(),
        "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    path = args.json or REPO / "benchmarks" / "results" / f"memory_{args.blocks}blocks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
