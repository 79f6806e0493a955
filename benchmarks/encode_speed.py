"""Calibration-text encoding (not a test): one ``tokenizers`` call on the whole text against
quantkit's cut-and-encode-in-parallel (:mod:`quantkit.text_split`), with the ids compared.

    python benchmarks/encode_speed.py [--smollm2-dir /tmp/smollm2-135m] [--repeat 3]

Tokenizers: stories260K's (SentencePiece-style BPE, the one ``benchmarks/job.py`` and
``benchmarks/memory.py`` copy into their models) and SmolLM2's (GPT-2 byte-level BPE; convert it
first, see ``benchmarks/quality.py``). Texts: every file in ``../shared/text``. Prints a table;
writes benchmarks/results/encode_speed_<machine>.json (best of ``--repeat`` runs each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))

from quantkit.mlxlm import plain_tokenizer  # noqa: E402


def best_of(fn, text: str, repeat: int) -> tuple[float, list[int]]:
    times, out = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = list(fn(text))
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-dir", type=Path, default=Path("/tmp/smollm2-135m"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tokenizers = {"stories260K": SHARED / "models" / "stories260K", "smollm2-135m": args.smollm2_dir}
    rows = []
    print(f"{'tokenizer':14s} {'rule':11s} {'text':24s} {'chars':>9s} {'whole s':>8s} {'cut s':>7s} {'speedup':>7s} equal")
    for name, path in tokenizers.items():
        if not (path / "tokenizer.json").exists():
            print(f"{name}: {path} is absent; skipped")
            continue
        tok = plain_tokenizer(path)
        assert tok is not None, path
        for text_path in sorted((SHARED / "text").iterdir()):
            text = text_path.read_text(errors="replace")
            whole_s, whole = best_of(lambda t: tok._backend.encode(t).ids, text, args.repeat)  # noqa: B023
            cut_s, cut = best_of(tok.encode, text, args.repeat)
            row = {"tokenizer": name, "rule": tok.split, "text": text_path.name, "chars": len(text),
                   "tokens": len(whole), "whole_s": whole_s, "cut_s": cut_s, "equal": whole == cut}
            rows.append(row)
            print(f"{name:14s} {str(tok.split):11s} {text_path.name:24s} {len(text):9d} {whole_s:8.3f} "
                  f"{cut_s:7.3f} {whole_s / cut_s:6.2f}x {row['equal']}")
    machine = "cpu" if os.cpu_count() and os.cpu_count() <= 4 else f"{os.cpu_count()}cores"
    out = args.json or REPO / "benchmarks" / "results" / f"encode_speed_{machine}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "loadavg": os.getloadavg(), "repeat": args.repeat, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
