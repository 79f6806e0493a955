"""Stop real `quantkit quantize` runs with SIGINT / SIGTERM at random moments; count clean stops.

    python benchmarks/signal_stress.py --trials 12 --json benchmarks/results/cpu_signal_stress.json
    python benchmarks/signal_stress.py --repo ../main --trials 12   # another checkout, same seed

Each trial starts ``python -m quantkit.cli quantize`` (stories260K, calibration 32 × 128 tokens
of the TinyStories sample, ~2-5 s on a loaded 2-core box: the signal falls into start-up
imports, loading, calibration, solving or writing), sends SIGINT (even trials) or SIGTERM (odd)
after a random delay (``--seed``), and records the exit status, the seconds from the signal to
the exit, whether the output appeared, the stderr line count and whether a traceback was
printed. A clean stop: exit 130 (SIGINT) / 143 (SIGTERM), one line, no traceback, no output.
A run that finished before its signal (exit 0, output written) counts as "finished"; a signal
that arrives while Python shuts down after a complete run (the output written) ends the process
by that signal (Python restores the default handlers at exit): "unclean", output complete.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))


def trial(repo: Path, sig: signal.Signals, delay: float, work: Path) -> dict:
    repo = repo.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("QUANTKIT_PAUSE_AT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantkit.cli", "quantize", str(SHARED.resolve() / "models" / "stories260K"),
         "-o", str(work / "o"), "--calibration", str(SHARED.resolve() / "text" / "tinystories_sample.txt"),
         "--num-samples", "32", "--seq-len", "128", "--group-size", "32", "-q"],
        env=env, cwd=repo, stderr=subprocess.PIPE, text=True)  # cwd: -m puts it first on sys.path
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    wrote = (work / "o").is_dir()
    clean = (proc.returncode == 128 + sig and len(lines) == 1 and not wrote
             and "Traceback" not in err)
    return {"signal": sig.name, "delay_s": round(delay, 2), "exit": proc.returncode,
            "stop_s": round(time.monotonic() - sent, 2), "wrote_output": wrote,
            "stderr_lines": len(lines), "traceback": "Traceback" in err,
            "outcome": "clean" if clean else "finished" if proc.returncode == 0 else "unclean"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="checkout whose quantkit is run")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random delays")
    ap.add_argument("--max-delay", type=float, default=4.5)
    ap.add_argument("--json", help="write the rows and the summary here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="signal-stress-") as tmp:
        for i in range(args.trials):
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            rows.append(trial(Path(args.repo), sig, rng.uniform(0.3, args.max_delay),
                              Path(tmp) / "run"))
    print(f"{'signal':8} {'delay s':>7} {'exit':>5} {'stop s':>6} {'lines':>5} {'output':>6}  outcome")
    for r in rows:
        print(f"{r['signal']:8} {r['delay_s']:7.2f} {r['exit']:5d} {r['stop_s']:6.2f} "
              f"{r['stderr_lines']:5d} {('yes' if r['wrote_output'] else 'no'):>6}  {r['outcome']}")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("clean", "finished", "unclean")}
    stops = [r["stop_s"] for r in rows if r["outcome"] == "clean"]
    print(f"{args.repo}: {counts}; stop time of clean stops "
          + (f"{min(stops):.2f}-{max(stops):.2f} s" if stops else "-"))
    if args.json:
        Path(args.json).write_text(json.dumps({"repo": args.repo, "seed": args.seed,
                                               "summary": counts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
