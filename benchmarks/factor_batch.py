"""Inverse-Hessian factors of a batch of experts: one by one against one stacked call (not a test).

``E`` Hessians ``(n, n)`` factorized with ``DampedCholesky.factor`` each (the old MoE path) or
together with ``DampedCholesky.factor_stack`` (one host round-trip per diagonal block for the
whole stack), both with the damping / dead-input preparation. ``quantkit.pipeline.expert_layers.expert_factors``
calls ``factor_many``, which is ``factor_stack`` on the ``blocked`` backend and one by one on
the host backends (where the stack measured slower on a CPU). Backends: ``numpy`` (float64 LAPACK on the
host, the CPU default) and ``blocked`` (matmuls on MLX's default device, diagonal blocks on the
host; split TF32 matmuls on a GPU, plain float32 on the CPU).

    python benchmarks/factor_batch.py --json results/factor_batch_cpu.json
    python benchmarks/factor_batch.py --sizes 768 2048 --experts 32 --backends blocked \
        --blocks 128 256 512 --repeat 3 --json results/factor_batch_h200.json

With a stack, the host's share of the work (float64 Cholesky and inverse of ``E`` diagonal
blocks at a time) stays what it was, ``∝ n · block²`` per matrix; only the round-trips and the
matmul launches are shared. Hence ``--blocks``: smaller diagonal blocks move work from the host
to the device's matmuls at the price of more round-trips, which a stack shares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.inverse import DampedCholesky  # noqa: E402

#: Environment variables that set the host BLAS's threads (recorded with the results).
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def hessians(n: int, experts: int, seed: int = 0) -> mx.array:
    """``experts`` distinct, realistic-looking Hessians: one correlated base ``XᵀX`` rescaled per
    expert plus an expert's own low-rank part; the second has dead inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * n, n)).astype(np.float32) * np.exp(rng.standard_normal(n)).astype(np.float32)
    x += 0.5 * rng.standard_normal((2 * n, 1)).astype(np.float32)  # a shared component
    base = x.T @ x / (2 * n)
    out = np.empty((experts, n, n), dtype=np.float32)
    for e in range(experts):
        s = rng.uniform(0.5, 2.0, n).astype(np.float32)
        y = rng.standard_normal((64, n)).astype(np.float32)
        out[e] = s[:, None] * base * s[None, :] + y.T @ y / 64
    if experts > 1:
        out[1, :, :8] = 0.0
        out[1, :8, :] = 0.0
    return mx.array(out)


def one_by_one(strategy: DampedCholesky, hs: mx.array) -> list[mx.array]:
    us = [strategy.factor(hs[e]).u for e in range(hs.shape[0])]
    mx.eval(us)
    return us


def batched(strategy: DampedCholesky, hs: mx.array) -> list[mx.array]:
    us = [f.u for f in strategy.factor_stack(hs)]
    mx.eval(us)
    return us


def timed(fn, *args, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[768, 2048])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["numpy", "blocked"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[512],
                    help="diagonal block sizes of the blocked backend")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()

    rows = []
    for n in args.sizes:
        hs = hessians(n, args.experts)
        mx.eval(hs)
        runs = [(b, nb) for b in args.backends for nb in (args.blocks if b == "blocked" else [0])]
        for backend, block in runs:
            strategy = DampedCholesky(0.01, backend, block or 512)
            batched(strategy, hs[:2])  # warm-up: JIT compilation, allocations
            one, t_one = timed(one_by_one, strategy, hs, repeat=args.repeat)
            many, t_many = timed(batched, strategy, hs, repeat=args.repeat)
            diff = max(float(mx.max(mx.abs(a - b)) / mx.max(mx.abs(b)))
                       for a, b in zip(many, one, strict=True))
            rows.append({"n": n, "experts": args.experts, "backend": backend,
                         "block": block or None, "one_by_one_s": t_one, "batched_s": t_many,
                         "speedup": t_one / t_many, "max_rel_diff": diff})
            del one, many

    device = str(mx.default_device())
    print(f"device {device}, mlx {mx.__version__}, numpy {np.__version__}, {platform.node()}")
    print("| n | experts | backend | block | one by one (s) | batched (s) | speedup | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['experts']} | {r['backend']} | {r['block'] or '—'} | "
              f"{r['one_by_one_s']:.3f} | "
              f"{r['batched_s']:.3f} | {r['speedup']:.2f}× | {r['max_rel_diff']:.1e} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device, "mlx": mx.__version__, "numpy": np.__version__,
            "command": " ".join(sys.argv), "cpu_count": os.cpu_count(),
            "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ}, "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
