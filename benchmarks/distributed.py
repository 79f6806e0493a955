"""Wall time of GPTQ quantization with 1 vs N processes on a random hidden-512 llama model.

    PYTHONPATH=. python benchmarks/distributed.py --processes 1 2 [--layers 4 --samples 32]
    PYTHONPATH=. python benchmarks/distributed.py --moe --processes 1 2   # mixtral, 8 experts

The model is built from mlx-lm's llama ``ModelArgs`` (``--moe``: mixtral, hidden 256, 8
experts of width 512, top 2) with random weights (seeded, identical in every rank);
calibration tokens are random ids. Each configuration runs its ranks with the local launcher
(ranks started directly with ``MLX_RANK``/``MLX_HOSTFILE``, ring backend over 127.0.0.1).
Every rank times ``quantize_model`` between two barriers, so process start-up and model
construction are left out. The table shows that time (slowest rank); the start-to-end wall
time of the whole job; the CPU seconds of the busiest rank and of all ranks (on a machine
shared with other jobs these say more than wall times: with a free core per rank, the wall
time approaches the busiest rank's CPU time); the units of work (layers, and experts of
expert layers) each rank quantized; and a digest of the quantized weights (it must be the
same for every process count). Prints a table, then the results as JSON on the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(layers: int, seed: int, moe: bool = False):
    import mlx.core as mx

    if moe:
        from mlx_lm.models.mixtral import Model, ModelArgs

        args = ModelArgs(
            model_type="mixtral", hidden_size=256, num_hidden_layers=layers,
            intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
            num_local_experts=8, num_experts_per_tok=2, vocab_size=2048,
        )
    else:
        from mlx_lm.models.llama import Model, ModelArgs

        args = ModelArgs(
            model_type="llama", hidden_size=512, num_hidden_layers=layers,
            intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
            rms_norm_eps=1e-5, vocab_size=2048, tie_word_embeddings=False,
        )
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def rank_main(opts: argparse.Namespace) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from quantkit import Recipe, quantize_model
    from quantkit.distributed import Distributed

    if opts.device == "cpu":
        mx.set_default_device(mx.cpu)
    group = (Distributed.init(strict=True, num_shards=opts.shards) if opts.processes[0] > 1
             else Distributed(num_shards=opts.shards))
    model = build_model(opts.layers, seed=0, moe=opts.moe)
    tokens = mx.random.randint(0, 2048, (opts.samples, opts.seq_len), key=mx.random.key(1))
    group.barrier("starting")
    t0, c0 = time.perf_counter(), time.process_time()
    result = quantize_model(model, tokens, Recipe.uniform("gptq", 4, 64),
                            batch_size=opts.batch_size, distributed=group)
    group.barrier("finishing")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(np.asarray(value).tobytes())
    per_rank: dict[int, int] = {}  # layers, and experts of expert layers, per rank
    for r in result.report.layers:
        if r.expert_ranks is not None:
            for e in r.expert_ranks:
                per_rank[e] = per_rank.get(e, 0) + 1
        elif r.status != "skipped" and r.expert is None:
            per_rank[r.rank] = per_rank.get(r.rank, 0) + 1
    Path(opts.result).with_suffix(f".{group.rank}.json").write_text(json.dumps({
        "rank": group.rank, "quantize_s": seconds, "cpu_s": cpu_seconds,
        "digest": digest.hexdigest()[:16],
        "layers_per_rank": per_rank, "peak_memory_gb": result.report.peak_memory_gb,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--moe", action="store_true", help="a random mixtral (8 experts)")
    parser.add_argument("--device", choices=["default", "cpu"], default="default",
                        help="run every rank on the CPU even where a GPU is present")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.rank:
        rank_main(opts)
        return

    from quantkit.launch import launch_local

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in opts.processes:
            result = Path(tmp) / f"n{n}"
            argv = [sys.executable, __file__, "--rank", "--result", str(result),
                    "--layers", str(opts.layers), "--samples", str(opts.samples),
                    "--seq-len", str(opts.seq_len), "--batch-size", str(opts.batch_size),
                    "--shards", str(opts.shards), "--processes", str(n), "--device", opts.device,
                    *(["--moe"] if opts.moe else [])]
            t0 = time.perf_counter()
            launched = launch_local(lambda rank, argv=argv: argv, n, timeout_s=opts.timeout, env=env)
            wall = time.perf_counter() - t0
            if not launched.ok:
                sys.exit(f"{n} processes: {launched.describe()}")
            ranks = [json.loads(result.with_suffix(f".{r}.json").read_text()) for r in range(n)]
            rows.append({
                "processes": n, "quantize_s": max(r["quantize_s"] for r in ranks), "job_s": wall,
                "cpu_s_max": max(r["cpu_s"] for r in ranks), "cpu_s_sum": sum(r["cpu_s"] for r in ranks),
                "digest": ranks[0]["digest"], "layers_per_rank": ranks[0]["layers_per_rank"],
                "peak_memory_gb_per_rank": max(r["peak_memory_gb"] or 0 for r in ranks),
            })
    base = rows[0]["quantize_s"]
    kind = "mixtral, hidden 256, 8 experts of 512" if opts.moe else "llama, hidden 512"
    print(f"random {kind}, {opts.layers} layers, {opts.samples}x{opts.seq_len} tokens, "
          f"GPTQ 4-bit g64, {opts.shards} shards, {os.cpu_count()} CPUs, device {opts.device}")
    print(f"{'processes':>9} {'quantize s':>10} {'speed-up':>8} {'job s':>7} "
          f"{'CPU s max/sum':>13} {'peak GB/rank':>12}  digest            units per rank")
    for row in rows:
        print(f"{row['processes']:>9} {row['quantize_s']:>10.2f} {base / row['quantize_s']:>8.2f} "
              f"{row['job_s']:>7.2f} {row['cpu_s_max']:>6.1f}/{row['cpu_s_sum']:<6.1f} "
              f"{row['peak_memory_gb_per_rank']:>12.3f}  {row['digest']}  {row['layers_per_rank']}")
    print(json.dumps({"settings": vars(opts) | {"cpus": os.cpu_count()}, "results": rows}))


if __name__ == "__main__":
    main()
