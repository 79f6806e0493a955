"""The regression matrix: quantize the shared fixtures through the CLI in every main configuration
and digest each output (its tensors and its ``config.json`` quantization dict).

The digest does not depend on how the tensors are split into files: it hashes every tensor's
name, dtype, shape and bytes in name order, read from all ``*.safetensors`` of the output, plus
``config["quantization"]`` as sorted JSON. So a sharded output and a single-file one with the
same tensors have the same digest.

Record the digests (CPU only; GPU arithmetic differs), from the repository root::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python tests/regression_matrix.py --write

``tests/test_regression_digests.py`` recomputes them and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
DIGESTS = Path(__file__).with_name("data") / "regression_digests.json"
GENERATOR = "OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python tests/regression_matrix.py --write"

#: Tiny calibration: 8 sequences of 64 tokens from the TinyStories sample.
CALIBRATION = ["--num-samples", "8", "--seq-len", "64", "--seed", "0"]

_FM_HEAD = ('[default]\nstrategy = "gptq"\nact_order = true\nscale_search = "hessian"\n'
            '[[optimizer]]\nname = "learned_rounding"\nmethod = "signround"\n'
            'target = "float_model"\nhead = true\n')

#: quantkit.defaults' "gptq_best_lr": the default pipeline until 2026-12-07.
_LR = ('[default]\nstrategy = "gptq"\nact_order = true\nscale_search = "hessian"\n'
       '[[optimizer]]\nname = "learned_rounding"\nmethod = "signround"\n')

#: quantkit.defaults' "gptq_best_lr_td_lrh": the default pipeline from session 28 to 30.
_S28 = ('[default]\nstrategy = "gptq"\nact_order = true\nscale_search = "hessian"\n'
        '[[optimizer]]\nname = "learned_rounding"\nmethod = "signround"\nlr_scale = 0.5\n'
        '[embedding]\ntied_damping = 0.1\n')

#: name → (fixture under ../shared/models, extra CLI arguments, recipe TOML or None)
CASES: dict[str, tuple[str, list[str], str | None]] = {
    "dense-gptq": ("stories260K-pad192", ["--strategy", "gptq"], None),
    "dense-rtn": ("stories260K-pad192", ["--strategy", "rtn"], None),
    "dense-gptaq": ("stories260K-pad192", [], '[default]\nstrategy = "gptaq"\n'),
    "dense-act-order": ("stories260K-pad192", [], '[default]\nstrategy = "gptq"\nact_order = true\n'),
    "dense-scale-search-mse": ("stories260K-pad192", [],
                               '[default]\nstrategy = "gptq"\nscale_search = "mse"\n'),
    "dense-mxfp4": ("stories260K-pad192", [],
                    '[default]\nstrategy = "gptq"\nmode = "mxfp4"\nbits = 4\ngroup_size = 32\n'),
    "dense-target-bpw": ("stories260K-pad192", ["--strategy", "gptq", "--target-bpw", "3.5"], None),
    "moe-gptq": ("stories260K-moe4", ["--strategy", "gptq"], None),
    "moe-rtn": ("stories260K-moe4", ["--strategy", "rtn"], None),
    "moe-mxfp4": ("stories260K-moe4", [],
                  '[default]\nstrategy = "gptq"\nmode = "mxfp4"\nbits = 4\ngroup_size = 32\n'),
    "moe-gptq-2proc": ("stories260K-moe4", ["--strategy", "gptq", "--processes", "2"], None),
    # The default pipeline of the time (GPTQ, then learned rounding against each block's float
    # outputs), and with AWQ before the solve and the optimizer's other method; recorded before
    # the block methods' memory cuts (branch lrmem), which must not change a byte. The default
    # has since gained [embedding] tied_damping and half the learned rounding's step: the
    # "-now" cases run whatever it is (since session 31 with end-to-end distillation: recorded
    # again then, the walk alone kept in the "-s28" cases).
    "dense-default": ("stories260K-pad192", [], _LR),
    "dense-default-2proc": ("stories260K-pad192", ["--processes", "2"], _LR),
    "moe-default": ("stories260K-moe4", [], _LR),
    "dense-default-now": ("stories260K-pad192", [], None),
    "moe-default-now": ("stories260K-moe4", [], None),
    # The default before it gained end-to-end distillation (session 31): the walk alone, whose
    # bytes the streamed stage's changes to the walker must not move.
    "dense-default-s28": ("stories260K-pad192", [], _S28),
    "moe-default-s28": ("stories260K-moe4", [], _S28),
    # Learned rounding towards the float model's own activations, then the output head (KL);
    # 2 processes on 16 sequences: a batch for each, so that the steps have data everywhere.
    "dense-lr-fm-head": ("stories260K-pad192", [], _FM_HEAD),
    "dense-lr-fm-head-2proc": ("stories260K-pad192", ["--processes", "2", "--num-samples", "16"],
                               _FM_HEAD),
    "dense-awq-lr-scales": ("stories260K-pad192", [],
                            '[default]\nstrategy = "gptq"\n[[transform]]\nname = "awq"\n'
                            '[[optimizer]]\nname = "learned_rounding"\nmethod = "scales"\n'),
}


def tensor_digest(out_dir: Path) -> str:
    """sha256 over the output's tensors (by name) and its ``config["quantization"]``."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        body = data[8 + n :]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise ValueError(f"tensor {name} is in two files of {out_dir}")
            lo, hi = info["data_offsets"]
            tensors[name] = (info["dtype"], info["shape"], body[lo:hi])
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(hashlib.sha256(raw).digest())
    quant = json.loads((out_dir / "config.json").read_text()).get("quantization")
    h.update(json.dumps(quant, sort_keys=True).encode())
    return h.hexdigest()


def run_case(name: str, root: Path) -> str:
    """Quantize one case with the CLI (a fresh process) and return its digest."""
    model, args, recipe = CASES[name]
    out = root / name
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(SHARED / "models" / model),
           "-o", str(out), "--calibration", str(SHARED / "text" / "tinystories_sample.txt"),
           *CALIBRATION, "--quiet", *args]
    if recipe is not None:
        path = root / f"{name}.toml"
        path.write_text(recipe)
        cmd += ["--recipe", str(path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return tensor_digest(out)


def run_matrix(names: list[str] | None = None) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="quantkit-regression-") as tmp:
        return {n: run_case(n, Path(tmp)) for n in (names or list(CASES))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the digests in {DIGESTS}")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    digests = run_matrix(args.cases or None)
    for name, d in digests.items():
        print(f"{name:26s} {d}")
    print(f"{len(digests)} cases in {time.perf_counter() - start:.1f} s")
    if args.write:  # the cases named replace theirs; the others' recorded digests stay
        DIGESTS.parent.mkdir(exist_ok=True)
        kept = json.loads(DIGESTS.read_text())["digests"] if args.cases and DIGESTS.exists() else {}
        DIGESTS.write_text(json.dumps({
            "generator": GENERATOR,
            "about": "sha256 per case of tests/regression_matrix.py: tensors by name + "
                     "config['quantization']; CPU only",
            "digests": {n: digests.get(n, kept.get(n)) for n in CASES if n in digests or n in kept},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
