"""Speed benchmark (not a test): quantkit GPTQ against mlx-lm's ``gptq_quantize``, same model,
same calibration tokens, same machine.

Models are random-weight models of real shapes built from mlx-lm ``ModelArgs``; calibration
tokens are random ids. mlx-lm runs in a child process under a time limit (``--mlx-lm-timeout``)
so a run that would take hours is reported as "did not finish in N s".

    python benchmarks/speed.py --model tiny-llama --json out.json            # CPU here
    python benchmarks/speed.py --model qwen3-0.6b --samples 128 --seq-len 512 # on the GPU

Prints one table row per model; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    # A small llama: every width a multiple of 64.
    "tiny-llama": ("llama", dict(
        model_type="llama", hidden_size=512, num_hidden_layers=4, intermediate_size=1536,
        num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=4096,
        tie_word_embeddings=True, rope_theta=10000.0,
    )),
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": ("qwen3", dict(
        model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True,
        rope_theta=1000000.0,
    )),
    # Qwen/Qwen3-8B config.json
    "qwen3-8b": ("qwen3", dict(
        model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False,
        rope_theta=1000000.0,
    )),
    # Qwen/Qwen3-30B-A3B config.json (128 experts, top 8); use --layers to shorten it.
    # meta-llama/Llama-3.1-70B config.json (for its per-block peak: run with --layers 2)
    "llama3-70b": ("llama", dict(
        model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=False, rope_theta=500000.0,
    )),
    "qwen3-moe": ("qwen3_moe", dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False,
        rope_theta=1000000.0, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True,
    )),
}

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def build(name: str, layers: int | None, dtype: str, seed: int):
    """Random-weight model of ``name``'s shapes, weights in ``dtype`` (evaluated)."""
    import importlib

    arch, cfg = MODELS[name]
    cfg = dict(cfg)
    if layers:
        cfg["num_hidden_layers"] = layers
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return model, cfg


def tokens_for(cfg, samples: int, seq_len: int, seed: int) -> mx.array:
    mx.random.seed(seed + 1)
    return mx.random.randint(0, cfg["vocab_size"], (samples, seq_len))


def weight_gb(model) -> float:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def max_rss_gb() -> float:
    """The process's peak resident memory so far (model building included): on CPU it also
    counts NumPy's arrays, which ``mx.get_peak_memory`` does not see."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB elsewhere


def _reset_peak():
    try:
        mx.reset_peak_memory()
    except AttributeError:
        pass


class PhaseClock:
    """Splits a walk's wall time by the walker's progress events: capture of block inputs,
    Hessian collection (block event → first layer event), quantization (layer events), and the
    quantized block's forward (last layer event → next block event)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.last = "start"
        self.phases: dict[str, float] = {}

    def __call__(self, event: str, info: dict) -> None:
        now = time.perf_counter()
        phase = {("start", "capture"): "setup", ("capture", "capture"): "capture",
                 ("capture", "block"): "capture", ("block", "layer"): "collect",
                 ("layer", "layer"): "quantize", ("layer", "block"): "block_forward",
                 ("start", "block"): "setup"}.get((self.last, event), f"{self.last}->{event}")
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.t
        self.t, self.last = now, event


def run_quantkit(args) -> dict:
    from quantkit import Recipe, quantize_model

    warmup_s = None
    if args.warmup:
        # JIT-compiled GPU kernels are built on first use: warm them on a one-block model.
        model, cfg = build(args.model, 1, args.dtype, args.seed)
        recipe = Recipe.uniform("gptq", bits=args.bits, group_size=args.group_size)
        t0 = time.perf_counter()
        quantize_model(model, tokens_for(cfg, args.batch_size, args.seq_len, args.seed), recipe,
                       batch_size=args.batch_size,
                       dtype=None if args.calib_dtype == "model" else args.calib_dtype)
        warmup_s = time.perf_counter() - t0
        del model

    model, cfg = build(args.model, args.layers, args.dtype, args.seed)
    tokens = tokens_for(cfg, args.samples, args.seq_len, args.seed)
    mx.eval(tokens)
    weights = weight_gb(model)
    options = {}
    if args.compute:
        options["compute"] = args.compute
    if args.linalg:
        options["linalg"] = args.linalg
    recipe = Recipe.uniform("gptq", bits=args.bits, group_size=args.group_size, **options)
    calib_dtype = None if args.calib_dtype == "model" else args.calib_dtype
    _reset_peak()
    clock = PhaseClock()
    t0 = time.perf_counter()
    result = quantize_model(model, tokens, recipe, batch_size=args.batch_size, dtype=calib_dtype,
                            progress=clock, backend=args.backend)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - t0
    clock("end", {})
    layers = result.report.layers
    by_status: dict[str, int] = {}
    for r in layers:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    rel = [r.relative_error for r in layers if r.relative_error is not None]
    worse = sum(1 for r in layers if r.hessian_error is not None
                and r.rtn_hessian_error is not None and r.hessian_error > r.rtn_hessian_error)
    return {
        "seconds": seconds,
        "warmup_seconds": warmup_s,
        "phases_s": clock.phases,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "report_peak_memory_gb": result.report.peak_memory_gb,
        "max_rss_gb": max_rss_gb(),
        "weights_gb": weights,
        "layer_seconds": sum(r.time_s or 0.0 for r in layers),
        "layers": by_status,
        "mean_relative_error": sum(rel) / len(rel) if rel else None,
        "layers_worse_than_rtn": worse,
        "fallback_reasons": sorted({r.reason for r in layers if r.status == "fallback"}),
        "recipe": options,
        "backend": args.backend,
        "calibration_dtype": args.calib_dtype,
    }


def run_mlx_lm(args) -> dict:
    from mlx_lm.quant.gptq import gptq_quantize

    model, cfg = build(args.model, args.layers, args.dtype, args.seed)
    tokens = tokens_for(cfg, args.samples, args.seq_len, args.seed)
    mx.eval(tokens)
    weights = weight_gb(model)
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    gptq_quantize(model, tokens, args.bits, args.group_size, args.bits, args.group_size,
                  batch_size=args.batch_size)
    mx.eval(model.parameters())
    # cpu_seconds: this process's CPU time (all threads) over the same span: on a shared,
    # loaded machine a steadier figure than the wall time.
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "weights_gb": weights}


def mlx_lm_in_child(args) -> dict:
    """mlx-lm's GPTQ in a child process, killed after ``--mlx-lm-timeout`` seconds."""
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mlx_lm_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish in {args.mlx_lm_timeout:.0f} s",
                "seconds": None, "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": f"failed (exit {proc.returncode})", "seconds": None,
                "stderr_tail": proc.stderr[-2000:]}
    out = json.loads(lines[-1])
    out["status"] = "finished"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-llama", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight dtype (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--calib-dtype", default=None, choices=[*sorted(DTYPES), "model"],
                   help="quantkit's calibration dtype (default: float32 on CPU, model on a GPU)")
    p.add_argument("--compute", default=None, help="GPTQQuantizer.compute (default auto)")
    p.add_argument("--linalg", default=None, help="GPTQQuantizer.linalg (default auto)")
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "numpy"],
                   help="quantkit's calibration compute backend (auto: numpy on a CPU device)")
    p.add_argument("--mlx-lm-timeout", type=float, default=600.0, help="0: skip mlx-lm")
    p.add_argument("--skip-quantkit", action="store_true")
    p.add_argument("--warmup", action="store_true",
                   help="quantize a one-block model first (JIT kernel builds), not timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    on_cpu = mx.default_device() == mx.cpu
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.calib_dtype = args.calib_dtype or ("float32" if on_cpu else "model")

    if args.child:
        print(json.dumps(run_mlx_lm(args)), flush=True)
        return

    row = {
        "model": args.model, "layers": args.layers, "samples": args.samples,
        "seq_len": args.seq_len, "bits": args.bits, "group_size": args.group_size,
        "dtype": args.dtype, "device": str(mx.default_device()), "mlx": mx.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    if not args.skip_quantkit:
        row["quantkit"] = run_quantkit(args)
        print(f"quantkit: {row['quantkit']['seconds']:.2f} s, peak "
              f"{row['quantkit']['peak_memory_gb']:.2f} GB (weights "
              f"{row['quantkit']['weights_gb']:.2f} GB; process max RSS "
              f"{row['quantkit']['max_rss_gb']:.2f} GB)", flush=True)
    if args.mlx_lm_timeout > 0:
        row["mlx_lm"] = mlx_lm_in_child(args)
        print(f"mlx-lm: {row['mlx_lm'].get('status')} {row['mlx_lm'].get('seconds')}", flush=True)
    qk = row.get("quantkit", {}).get("seconds")
    ml = row.get("mlx_lm", {}).get("seconds")
    if qk and ml:
        row["speedup"] = ml / qk
    elif qk and row.get("mlx_lm", {}).get("status", "").startswith("did not finish"):
        row["speedup"] = f"> {args.mlx_lm_timeout / qk:.1f}"
    print(json.dumps(row, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
