"""Time per layer of the MLX GPTQ column loop, with and without ``mx.compile``. Not a test.

    python benchmarks/gptq_loop.py --json benchmarks/results/cpu_gptq_loop.json --baseline main
    python benchmarks/gptq_loop.py --mode mxfp4 --baseline main
    python benchmarks/gptq_loop.py --search --baseline main

``--mode mxfp4|nvfp4|mxfp8`` times the float-format loop
(:func:`quantkit.kernels.floatfmt.gptq_quantize_float`, group scales from ``mx.quantize``);
``--search`` the affine loop with ``params_fn=search_affine_params`` and per-column importances
(what ``scale_search="hessian"`` runs, on every device).

For each shape (random weights, a correlated-input Hessian, 4-bit g64 by default) the variants
run interleaved, ``--repeat`` times each after one warm-up call, and the table gives the median
and the fastest run in seconds:

* ``compiled``: :func:`quantkit.kernels.gptq.gptq_quantize` (or the float loop) as shipped, the
  column's rounding and error fused by ``mx.compile``;
* ``uncompiled``: the same loop under ``mx.disable_compile()``;
* ``baseline``: with ``--baseline REF``, the loop of ``quantkit/kernels/gptq.py`` (``floatfmt.py``
  for a float mode; and ``search.py`` with ``--search``) at git ``REF``;
* ``numpy``: the NumPy loop (what ``compute="auto"`` runs on a Linux CPU), for scale (its
  matmuls are OpenBLAS's, so only the share of equal codes is reported);
* ``matmuls``: only the loop's lazy updates of the columns after each block (``rest -= E @ U``),
  the part no change to the column steps can speed up.

``uncompiled``'s and ``baseline``'s codes and dequantized weights are checked bit for bit
against ``compiled``.
``first call``: the first call in a fresh process, ``compiled`` with an empty ``TMPDIR`` (MLX's
CPU backend builds its fused kernels with the C++ compiler and caches them under ``$TMPDIR/mlx``),
``compiled`` again with those kernels built (tracing only), and ``uncompiled``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.kernels.floatfmt import float_scales, gptq_quantize_float  # noqa: E402
from quantkit.kernels.gptq import gptq_quantize  # noqa: E402
from quantkit.kernels.gptq_fast import gptq_quantize_numpy  # noqa: E402
from quantkit.kernels.linalg import inverse_hessian_factor, prepare_hessian  # noqa: E402
from quantkit.kernels.search import search_affine_params  # noqa: E402


def layer(n_out: int, n_in: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    """Random weights and the inverse-Hessian factor of correlated, unevenly scaled inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * n_in, n_in)) @ (rng.standard_normal((n_in, n_in)) / n_in**0.5)
    x = x * np.exp(rng.standard_normal(n_in))
    h, _, _ = prepare_hessian(x.T @ x / len(x), 0.01)
    u = mx.array(inverse_hessian_factor(h).astype(np.float32))
    w = mx.array((rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32))
    mx.eval(w, u)
    return w, u


def load_at(ref: str, name: str) -> types.ModuleType:
    """Module ``quantkit/kernels/<name>.py`` as it was at git ``ref``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:quantkit/kernels/{name}.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"{name}_at_{ref}")
    exec(compile(source.replace("from .", "from quantkit.kernels."), f"{ref}:{name}.py", "exec"),
         module.__dict__)
    return module


def for_mode(fn, mode: str, search=None):
    """``fn(w, u, bits=, group_size=)`` for the affine loop (with ``search`` as its
    ``params_fn``, with fixed per-column importances), or a float-format loop with the
    group scales ``mx.quantize`` picks."""
    if mode == "affine":
        if search is None:
            return fn

        def run_search(w, u, *, bits, group_size):
            importance = mx.linspace(0.5, 2.0, w.shape[1])
            return fn(w, u, bits=bits, group_size=group_size, params_fn=search,
                      importance=importance)
        return run_search

    def run(w, u, *, bits, group_size):
        return fn(w, u, float_scales(w, mode, group_size), mode=mode)
    return run


def kernel(mode: str, search: bool = False):
    return for_mode(gptq_quantize if mode == "affine" else gptq_quantize_float, mode,
                    search_affine_params if search else None)


def uncompiled(fn):
    def run(*args, **kwargs):
        mx.disable_compile()
        try:
            return fn(*args, **kwargs)
        finally:
            mx.enable_compile()
    return run


def block_matmuls(w, u, *, bits, group_size, block_size=128):
    n_in = w.shape[1]
    block = max(group_size, (block_size // group_size) * group_size)
    rest = w
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        rest = rest[:, b1 - b0:]
        if b1 < n_in:
            rest = rest - w[:, b0:b1] @ u[b0:b1, b1:]
        mx.eval(rest)
    return None


def first_call(n_out: int, n_in: int, args: argparse.Namespace) -> dict:
    """First calls in fresh processes: compiled with MLX's kernel cache (``$TMPDIR/mlx``) empty,
    compiled with it filled, and uncompiled (whose first call has its own start-up costs)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, flag in (("first_call_s", "compiled"), ("traced_first_call_s", "compiled"),
                          ("uncompiled_first_call_s", "uncompiled")):
            cmd = [sys.executable, __file__, "--_child", f"{n_out}x{n_in}", flag,
                   "--bits", str(args.bits), "--group-size", str(args.group_size),
                   "--mode", args.mode] + (["--search"] if args.search else [])
            res = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "TMPDIR": tmp})
            out[key] = json.loads(res.stdout)
    return out


def child(shape: str, variant: str, args: argparse.Namespace) -> None:
    w, u = layer(*map(int, shape.split("x")))
    if variant == "uncompiled":
        mx.disable_compile()
    t0 = time.perf_counter()
    o = kernel(args.mode, args.search)(w, u, bits=args.bits, group_size=args.group_size)
    mx.eval(o.codes, o.dequantized)
    print(json.dumps(time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1536x512", "512x1536", "2048x2048"],
                    help="OUTxIN")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, help="default 64; a float mode's own size")
    ap.add_argument("--mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    ap.add_argument("--search", action="store_true",
                    help="affine groups by search_affine_params (scale_search='hessian')")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--baseline", help="git ref whose loop to time as well (e.g. main)")
    ap.add_argument("--no-first-call", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.group_size is None:
        args.group_size = {"affine": 64, "nvfp4": 16}.get(args.mode, 32)
    if args._child:
        child(*args._child, args)
        return

    if args.search and args.mode != "affine":
        ap.error("--search is for the affine loop")
    main_kernel = kernel(args.mode, args.search)
    variants = {"compiled": main_kernel, "uncompiled": uncompiled(main_kernel)}
    if args.baseline:
        if args.mode == "affine":
            old = load_at(args.baseline, "gptq").gptq_quantize
            search = load_at(args.baseline, "search").search_affine_params if args.search else None
        else:
            old, search = load_at(args.baseline, "floatfmt").gptq_quantize_float, None
        variants["baseline"] = for_mode(old, args.mode, search)
    if args.mode == "affine" and not args.search:
        variants["numpy"] = gptq_quantize_numpy
    variants["matmuls"] = block_matmuls
    kw = {"bits": args.bits, "group_size": args.group_size}
    rows = []
    for shape in args.shapes:
        n_out, n_in = map(int, shape.split("x"))
        w, u = layer(n_out, n_in)
        times: dict[str, list[float]] = {k: [] for k in variants}
        identical = {}
        ref = None
        for rep in range(args.repeat + 1):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                out = fn(w, u, **kw)
                if out is not None:
                    mx.eval(out.codes, out.dequantized)
                dt = time.perf_counter() - t0
                if rep == 0:  # warm-up; check the results once
                    if name == "compiled":
                        ref = out
                    elif name in ("uncompiled", "baseline"):
                        identical[name] = bool(
                            mx.array_equal(out.codes, ref.codes)
                            and mx.all(out.dequantized.view(mx.uint32)
                                       == ref.dequantized.view(mx.uint32)))
                    elif name == "numpy":
                        same_codes = float(mx.mean(out.codes == ref.codes))
                    continue
                times[name].append(dt)
        row = {"shape": shape, "mode": args.mode, "search": args.search, "bits": args.bits,
               "group_size": args.group_size,
               "median_s": {k: float(np.median(v)) for k, v in times.items()},
               "min_s": {k: min(v) for k, v in times.items()},
               "bitwise_equal_to_compiled": identical}
        if "numpy" in variants:
            row["numpy_same_codes"] = same_codes
        if not args.no_first_call:
            row.update(first_call(n_out, n_in, args))
        rows.append(row)
        print_row(row, first=not rows[:-1])

    if args.json:
        info = {"mlx": mx.__version__, "device": str(mx.default_device()),
                "cpu_count": os.cpu_count(), "repeat": args.repeat, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1))


def print_row(row: dict, first: bool) -> None:
    names = list(row["median_s"])
    if first:
        head = ["shape"] + [f"{n} med/min s" for n in names] + ["uncompiled/compiled"]
        if "baseline" in names:
            head.append("baseline/compiled")
        if "first_call_s" in row:
            head += ["first call: compiled cold/warm cache, uncompiled s"]
        print(" | ".join(head))
    med, mn = row["median_s"], row["min_s"]
    cells = [row["shape"]] + [f"{med[n]:.3f}/{mn[n]:.3f}" for n in names]
    cells.append(f"{med['uncompiled'] / med['compiled']:.2f}x")
    if "baseline" in names:
        cells.append(f"{med['baseline'] / med['compiled']:.2f}x")
    if "first_call_s" in row:
        cells.append(f"{row['first_call_s']:.2f}/{row['traced_first_call_s']:.2f}/"
                     f"{row['uncompiled_first_call_s']:.2f}")
    bad = [k for k, ok in row["bitwise_equal_to_compiled"].items() if not ok]
    print(" | ".join(cells) + (f"  (NOT bitwise equal: {', '.join(bad)})" if bad else ""),
          flush=True)


if __name__ == "__main__":
    main()
