"""Micro-measurements behind the choices in quantkit's speed paths (not a test).

Matmul precision on the default device, the inverse-factor backends (time and error against a
float64 NumPy factor), and the GPTQ column loops (time, agreement with the MLX reference loop).

    python benchmarks/device_probe.py --json probe.json [--sizes 1024 4096 12288]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.kernels.blocked_cholesky import (  # noqa: E402
    blocked_factor_mlx,
    prepare_hessian_mlx,
    reversed_factor_numpy,
)
from quantkit.kernels.gptq import gptq_quantize  # noqa: E402
from quantkit.kernels.gptq_fast import gptq_quantize_cuda, gptq_quantize_numpy  # noqa: E402
from quantkit.kernels.linalg import _factor_mlx, _factor_numpy, prepare_hessian  # noqa: E402


def timed(fn, *a, repeat=1, **kw):
    out = fn(*a, **kw)  # warm-up (JIT, allocations)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn(*a, **kw)
    return out, (time.perf_counter() - t0) / repeat


def hessian(n: int, seed: int = 0) -> mx.array:
    """A realistic-looking Hessian: correlated activations with spread-out column scales."""
    mx.random.seed(seed)
    m = max(2 * n, 4096)
    x = mx.random.normal((m, n)) * mx.exp(mx.random.normal((n,)))
    x = x + 0.5 * mx.random.normal((m, 1))  # a shared component: strong correlations
    h = (x.T @ x) / m
    mx.eval(h)
    return h


def matmul_probe(out: dict) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    got = np.array(mx.array(a) @ mx.array(b), dtype=np.float64)
    out["matmul_f32_rel_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    n = 512 if mx.default_device() == mx.cpu else 8192
    for name, dt in (("bf16", mx.bfloat16), ("f32", mx.float32)):
        x = mx.random.normal((n, n)).astype(dt)
        mx.eval(x)
        _, t = timed(lambda x=x: mx.eval(x @ x), repeat=5)
        out[f"matmul_{name}_tflops"] = 2 * n**3 / t / 1e12
    try:
        n = 256 if mx.default_device() == mx.cpu else 4096
        x = mx.random.normal((n, n)).astype(mx.float64)
        mx.eval(x)
        _, t = timed(lambda: mx.eval(x @ x), repeat=3)
        out["matmul_f64_tflops"] = 2 * n**3 / t / 1e12
    except Exception as exc:  # noqa: BLE001
        out["float64_matmul"] = f"{type(exc).__name__}: {exc}"[:200]


def factor_probe(out: dict, sizes: list[int], blocks: list[int]) -> None:
    rows = []
    for n in sizes:
        h = hessian(n)
        h64 = np.array(h, dtype=np.float64)
        hd, _, _ = prepare_hessian(h64, 0.01)
        row = {"n": n}
        t0 = time.perf_counter()
        ref = reversed_factor_numpy(hd)
        row["numpy_reversed_s"] = time.perf_counter() - t0
        scale = np.abs(ref).max()
        if n <= 4096:
            t0 = time.perf_counter()
            u = _factor_numpy(hd)
            row["numpy_inv_s"] = time.perf_counter() - t0
            row["numpy_inv_err"] = float(np.abs(u - ref).max() / scale)
        if n <= 2048:
            t0 = time.perf_counter()
            u = _factor_mlx(hd)
            row["mlx_cpu_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hm, _, _ = prepare_hessian_mlx(h, 0.01)
        mx.eval(hm)
        row["prepare_mlx_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_hessian(np.array(h), 0.01)
        row["prepare_numpy_s"] = time.perf_counter() - t0
        for b in blocks:
            if b > n:
                continue
            for name, dt in (("f32", mx.float32), ("f64", mx.float64)):
                try:
                    u, t = timed(blocked_factor_mlx, hm, b, dt)
                except Exception as exc:  # noqa: BLE001
                    row[f"blocked{b}_{name}_error"] = str(exc)[:300]
                    continue
                row[f"blocked{b}_{name}_s"] = t
                row[f"blocked{b}_{name}_err"] = float(
                    np.abs(np.array(u, dtype=np.float64) - ref).max() / scale)
        rows.append(row)
        print(row, flush=True)
    out["factor"] = rows


def gptq_probe(out: dict, shapes: list[tuple[int, int]]) -> None:
    rows = []
    for n_out, n_in in shapes:
        h = hessian(n_in, seed=1)
        hd, _, _ = prepare_hessian(np.array(h, dtype=np.float64), 0.01)
        u = mx.array(reversed_factor_numpy(hd).astype(np.float32))
        w = (mx.random.normal((n_out, n_in)) * 0.02).astype(mx.float32)
        mx.eval(u, w)
        row = {"shape": [n_out, n_in]}
        kw = dict(bits=4, group_size=64, block_size=128, storage_dtype=mx.bfloat16)

        def run(fn, w=w, u=u, kw=kw):
            o = fn(w, u, **kw)
            mx.eval(o.codes, o.dequantized, o.scales, o.biases)
            return o

        ref = None
        if n_out * n_in <= 4096 * 4096:
            ref, row["mlx_s"] = timed(run, gptq_quantize)
        try:
            fast, row["cuda_s"] = timed(run, gptq_quantize_cuda, repeat=3)
            if ref is not None:
                row["cuda_code_mismatch"] = float(np.mean(np.array(fast.codes) != np.array(ref.codes)))
                row["cuda_deq_maxdiff"] = float(np.abs(np.array(fast.dequantized)
                                                       - np.array(ref.dequantized)).max())
                row["cuda_scale_maxdiff"] = float(np.abs(np.array(fast.scales)
                                                         - np.array(ref.scales)).max())
                err = lambda o, w=w, h=h: float(mx.sum(((w - o.dequantized) @ h) * (w - o.dequantized)))  # noqa: E731
                row["herr_ref"], row["herr_cuda"] = err(ref), err(fast)
        except Exception:  # noqa: BLE001
            row["cuda_error"] = traceback.format_exc()[-1500:]
        if n_out * n_in <= 1024 * 3072:
            _, row["numpy_s"] = timed(run, gptq_quantize_numpy)
        rows.append(row)
        print(row, flush=True)
    out["gptq"] = rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 12288])
    p.add_argument("--blocks", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--gptq-shapes", nargs="*", default=["2048x1024", "4096x1024", "1024x3072",
                   "4096x4096", "12288x4096", "4096x12288"], help="OUTxIN weight shapes")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.gptq_shapes]
    out: dict = {"device": str(mx.default_device()), "mlx": mx.__version__}
    for name, fn, a in (
        ("matmul", matmul_probe, ()),
        ("gptq", gptq_probe, (shapes,)),
        ("factor", factor_probe, (args.sizes, args.blocks)),
    ):
        try:
            fn(out, *a)
        except Exception:  # noqa: BLE001
            out[f"{name}_error"] = traceback.format_exc()[-2000:]
            print(out[f"{name}_error"], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k not in ("factor", "gptq")}, indent=2))


if __name__ == "__main__":
    main()
