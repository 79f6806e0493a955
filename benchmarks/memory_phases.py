"""Where the CPU job's peak resident memory comes from (not a test): runs ``quantkit quantize``
in this process with the walker's functions wrapped; at each entry and exit the kernel's
resident high-water mark (``VmHWM``, Linux) is read and reset (``/proc/self/clear_refs``), so
each phase (a nesting of wrapped calls) gets the true peak RSS reached inside it, with MLX's
peak active memory beside it. Linux only (``/proc``).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/memory_phases.py --json OUT.json -- \\
        quantize MODEL_DIR -o OUT_DIR --overwrite --num-samples 32 --seq-len 256 -q

Prints the phases by peak RSS (MiB); ``--json`` writes every phase and the event timeline.
``benchmarks/memory.py`` builds the model these were measured on (``--blocks 4``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
import time
from pathlib import Path

STACK: list[str] = []
PHASES: dict[str, dict[str, float]] = {}
EVENTS: list[list] = []
T0 = time.time()


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def mark(label: str) -> None:
    """Close the segment that ends here: its peak RSS and MLX peak go to the current phase."""
    import mlx.core as mx

    s = _status()
    key = " > ".join(STACK) or "(top)"
    peak_mx = mx.get_peak_memory() / 2**20
    entry = PHASES.setdefault(key, {"max_rss_mib": 0.0, "mlx_peak_mib": 0.0, "segments": 0})
    entry["max_rss_mib"] = max(entry["max_rss_mib"], s["VmHWM"])
    entry["mlx_peak_mib"] = max(entry["mlx_peak_mib"], peak_mx)
    entry["segments"] += 1
    EVENTS.append([round(time.time() - T0, 3), label, key, s["VmHWM"], s["VmRSS"], s["RssAnon"],
                   s["RssFile"], peak_mx, mx.get_active_memory() / 2**20])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    mx.reset_peak_memory()


def wrap(owner, name: str, label: str | None = None) -> None:
    f = getattr(owner, name)
    label = label or f"{getattr(owner, '__name__', owner)}.{name}"

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        mark("enter " + label)
        STACK.append(label)
        try:
            return f(*args, **kwargs)
        finally:
            mark("exit " + label)
            STACK.pop()

    if isinstance(inspect.getattr_static(owner, name), staticmethod):
        wrapped = staticmethod(wrapped)  # type: ignore[assignment]
    setattr(owner, name, wrapped)


def install() -> None:
    import quantkit.api as api
    import quantkit.host as host
    import quantkit.inverse as inverse
    import quantkit.pipeline.solve as solve
    import quantkit.quantizers as quantizers
    import quantkit.walker as walker
    from quantkit.checkpoint import BlockFiles, DirectoryCheckpoint

    for name in ("load_model", "scan_weights", "load_calibration", "save_streamed", "quantize_model"):
        wrap(api, name)
    for name in ("_capture", "_collect_sharded", "_quantize_all", "quantize_layer",
                 "_swap_standins", "_collect_outside", "_install"):
        wrap(walker.ModelWalker, name)
    wrap(walker, "solve_jointly")  # pipeline/solve.py's, as the walker calls it
    original_phase = walker.ModelWalker._phase

    def phase(self, name):  # the walker's own phases (calibrate, solve, write, ...)
        import contextlib

        @contextlib.contextmanager
        def scope():
            mark(f"enter phase:{name}")
            STACK.append(f"phase:{name}")
            try:
                with original_phase(self, name):
                    yield
            finally:
                mark(f"exit phase:{name}")
                STACK.pop()
        return scope()

    walker.ModelWalker._phase = phase
    wrap(solve, "hessian_figures")  # as pipeline/solve.py calls it
    wrap(inverse.DampedCholesky, "factor_stack")
    wrap(inverse, "prepare_hessians")
    wrap(inverse, "inverse_hessian_factor")
    wrap(quantizers.GPTQQuantizer, "_solve")
    wrap(host.HostLinear, "__call__", "HostLinear")
    wrap(host.HostHessianCollector, "update", "HostHessianCollector.update")
    for cls in (BlockFiles, DirectoryCheckpoint):
        wrap(cls, "save", cls.__name__ + ".save")
    # The default pipeline's block optimizer (learned rounding): its setup, each step's
    # gradients (ending in the sum over processes; the update and the exact objective follow
    # it), the stored values of a new best state.
    import quantkit.blocks.rounding as rounding

    wrap(walker.ModelWalker, "_optimize")
    for name in ("optimize", "_layers"):
        wrap(rounding.LearnedRounding, name)
    wrap(rounding, "_reduce_tree", "rounding.step")
    wrap(rounding, "_stored", "rounding.best")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the quantkit arguments")
    args = parser.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    sys.argv = ["quantkit", *cli_args]
    import quantkit.cli as cli

    install()
    mark("start")
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        mark("end")
    rows = sorted(PHASES.items(), key=lambda kv: -kv[1]["max_rss_mib"])
    print(f"{'max RSS MiB':>11s} {'MLX peak':>9s}  phase")
    for key, v in rows[: args.top]:
        print(f"{v['max_rss_mib']:11.0f} {v['mlx_peak_mib']:9.0f}  {key}")
    if args.json:
        args.json.write_text(json.dumps({"argv": cli_args, "phases": PHASES, "events": EVENTS},
                                        indent=0))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
