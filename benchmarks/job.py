"""Whole-job benchmark (not a test): what a user runs, ``quantkit quantize DIR -o OUT``, end to
end on a model directory written to disk, beside the in-memory core (``quantize_model`` on the
loaded model) and mlx-lm's ``gptq_quantize`` (via ``benchmarks/speed.py --skip-quantkit``).

Beside each wall time, the CPU seconds (user + system, all threads) of the same span: the CLI
process's whole life, the core's ``quantize_model`` call, mlx-lm's ``gptq_quantize`` call. On a
machine shared with other jobs the wall time stretches with the load; the CPU seconds much
less, so ``speedup_vs_mlx_lm_cpu`` is the steadier ratio there.

The CLI runs twice in the same session, with the defaults (checkpointing on) and with
``--no-checkpoint``: their ratio is the checkpoint's cost (target ≤ 1.10×). The job's phases
(load, check, tokenize, calibrate, solve, resume, write) come from the run report.

Models are speed.py's random-weight shapes saved with mlx-lm, with the stories260K tokenizer
(ids < 512 fit every vocabulary); the calibration text is ``../shared/text/wikitext2_test.raw``.

    OPENBLAS_NUM_THREADS=1 python benchmarks/job.py                       # tiny-llama, CPU
    source .devwhl/setup.sh .devwhl && python benchmarks/job.py --model qwen3-0.6b \\
        --samples 128 --seq-len 512                                        # the GPU machine

Prints a table; writes benchmarks/results/job_<model>_<samples>x<seq-len>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import DTYPES, MODELS, build  # noqa: E402

SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
TEXT = SHARED / "text" / "wikitext2_test.raw"


def save_dir(path: Path, model_name: str, layers: int | None, dtype: str, seed: int) -> float:
    """The random model written as an mlx-lm directory; returns its weights' GB."""
    from mlx_lm.utils import save_model

    model, cfg = build(model_name, layers, dtype, seed)
    path.mkdir(parents=True)
    save_model(path, model, donate_model=True)
    _config_and_tokenizer(path, cfg, dtype)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def _config_and_tokenizer(path: Path, cfg: dict, dtype: str) -> None:
    """config.json and the stories260K tokenizer (ids < 512 fit every vocabulary) beside the weights."""
    from mlx_lm.utils import save_config

    save_config(dict(cfg, torch_dtype=dtype), config_path=path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "models" / "stories260K" / name, path / name)


def save_dir_streamed(path: Path, model_name: str, layers: int | None, dtype: str,
                      seed: int, shard_gb: float = 4.0) -> float:
    """As :func:`save_dir`, block by block, for models larger than the device's memory.

    The parameter names and shapes come from a one-block model that is never evaluated; each
    block's weights are drawn directly in ``dtype`` (normal, std 0.02; norms 1), written to
    mlx-lm's sharded layout (``model-0000K-of-0000N.safetensors`` + index) and released.
    """
    import importlib

    from mlx.utils import tree_flatten

    arch, cfg = MODELS[model_name]
    cfg = dict(cfg)
    if layers:
        cfg["num_hidden_layers"] = layers
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    one = module.Model(module.ModelArgs.from_dict(dict(cfg, num_hidden_layers=1)))
    names = dict(tree_flatten(one.parameters()))
    top = {k: v.shape for k, v in names.items() if not k.startswith("model.layers.0.")}
    block = {k[len("model.layers.0."):]: v.shape for k, v in names.items()
             if k.startswith("model.layers.0.")}
    dt = DTYPES[dtype]
    mx.random.seed(seed)

    def draw(name: str, shape) -> mx.array:
        if name.endswith("norm.weight"):
            return mx.ones(shape, dtype=dt)
        return (mx.random.normal(shape) * 0.02).astype(dt)

    groups: list[dict[str, tuple]] = [top] + [
        {f"model.layers.{i}.{k}": v for k, v in block.items()} for i in range(cfg["num_hidden_layers"])]
    shards: list[list[dict[str, tuple]]] = [[]]
    size = 0.0
    for g in groups:
        gb = sum(int(np.prod(s)) for s in g.values()) * dt.size / 1e9
        if shards[-1] and size + gb > shard_gb:
            shards.append([])
            size = 0.0
        shards[-1].append(g)
        size += gb
    path.mkdir(parents=True)
    index: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        arrays = {n: draw(n, s) for g in shard for n, s in g.items()}
        mx.eval(arrays)
        mx.save_safetensors(str(path / fname), arrays, metadata={"format": "mlx"})
        total += sum(a.nbytes for a in arrays.values())
        index.update({n: fname for n in arrays})
        del arrays
        mx.clear_cache()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2))
    _config_and_tokenizer(path, cfg, dtype)
    return total / 1e9


def cli_job(model_dir: Path, out: Path, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(model_dir), "-o", str(out),
           "--calibration", str(TEXT), "--num-samples", str(args.samples), "--seq-len",
           str(args.seq_len), "--bits", str(args.bits), "--group-size", str(args.group_size), "--json",
           *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
           *(["--strategy", args.strategy] if args.strategy != "default" else []), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed ({proc.returncode}): {proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    output_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    shutil.rmtree(out, ignore_errors=True)
    errors = [r["relative_error"] for r in report.get("layers", [])
              if r.get("relative_error") is not None]
    return {"wall_s": wall, "cpu_s": cpu, "phases_s": report.get("phases", {}),
            "walk_s": report["time_s"], "output_gb": output_gb,
            "peak_memory_gb": report.get("peak_memory_gb"),
            # the largest max RSS of this script's children so far (Linux: KiB)
            "children_max_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
            "mean_relative_error": sum(errors) / len(errors) if errors else None}


def _children_cpu() -> float:
    """User + system CPU seconds of this script's finished children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def core(model_dir: Path, args) -> dict:
    """``quantize_model`` on the model loaded in memory (what speed.py times)."""
    from quantkit import Recipe, calibration_tokens, quantize_model
    from quantkit.io import load_model

    model, tokenizer, _ = load_model(model_dir)
    tokens = calibration_tokens(tokenizer, TEXT, args.samples, args.seq_len, 0)
    mx.eval(tokens)
    recipe = Recipe.uniform("gptq", bits=args.bits, group_size=args.group_size)
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_model(model, tokens, recipe, batch_size=args.batch_size,
                   dtype=None if args.calib_dtype == "model" else args.calib_dtype)
    mx.eval(model.parameters())
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def mlx_lm(args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--skip-quantkit",
               "--model", args.model, "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size or 8), "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--dtype", args.dtype,
               "--mlx-lm-timeout", str(args.mlx_lm_timeout), "--json", f.name]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"status": f"failed ({proc.returncode})", "stderr": proc.stderr[-2000:]}
        return json.loads(Path(f.name).read_text()).get("mlx_lm", {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-llama", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None,
               help="calibration sequences a pass (default: the CLI's own choice; mlx-lm gets 8)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight dtype of the model dir (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--calib-dtype", default=None, help="core's calibration dtype (as the CLI's default)")
    p.add_argument("--strategy", default="default",
                   help="the CLI runs' --strategy (default: none, the default pipeline; gptq: what "
                        "the core and mlx-lm run)")
    p.add_argument("--mlx-lm-timeout", type=float, default=600.0, help="0: skip mlx-lm")
    p.add_argument("--skip-core", action="store_true")
    p.add_argument("--warmup", action="store_true",
                   help="run the CLI once untimed first (MLX's CUDA backend compiles kernels on first use)")
    p.add_argument("--bf16-calibration", action="store_true",
                   help="also time the CLI with --dtype bfloat16 and compare its error figures")
    p.add_argument("--once", action="store_true",
                   help="only the default CLI run (no --no-checkpoint run): for the largest shapes")
    p.add_argument("--stream-write", action="store_true",
                   help="write the random model block by block (models larger than memory)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the model directory is written (default: a temporary directory)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the quantized output goes (default: beside the model)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    on_cpu = mx.default_device() == mx.cpu
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.calib_dtype = args.calib_dtype or "float32"
    device = "cpu" if on_cpu else "gpu"
    row: dict = {"model": args.model, "layers": args.layers, "samples": args.samples,
                 "cli_strategy": args.strategy,
                 "seq_len": args.seq_len, "dtype": args.dtype, "device": str(mx.default_device()),
                 "mlx": mx.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="quantkit-job-", dir=args.work_dir) as tmp:
        model_dir = Path(tmp) / "model"
        out_dir = (args.out_dir or Path(tmp)) / "out"
        t0 = time.perf_counter()
        writer = save_dir_streamed if args.stream_write else save_dir
        row["weights_gb"] = writer(model_dir, args.model, args.layers, args.dtype, 0)
        row["write_model_s"] = time.perf_counter() - t0
        print(f"model written: {row['weights_gb']:.2f} GB in {row['write_model_s']:.1f} s", flush=True)
        if args.warmup:
            cli_job(model_dir, out_dir, args)
        row["cli"] = cli_job(model_dir, out_dir, args)
        if not args.once:
            row["cli_no_checkpoint"] = cli_job(model_dir, out_dir, args, "--no-checkpoint")
        if args.bf16_calibration:
            row["cli_bf16"] = cli_job(model_dir, out_dir, args, "--dtype", "bfloat16")
        if not args.skip_core:
            row["core"] = core(model_dir, args)
    if args.mlx_lm_timeout > 0:
        row["mlx_lm"] = mlx_lm(args)
    row["loadavg_end"] = os.getloadavg()
    if "cli_no_checkpoint" in row:
        row["checkpoint_ratio"] = row["cli"]["wall_s"] / row["cli_no_checkpoint"]["wall_s"]

    print(f"{args.model} ({row['weights_gb']:.2f} GB {args.dtype}), {args.samples}×{args.seq_len} "
          f"tokens, {row['device']}")
    print(f"{'run':34s} {'seconds':>8s} {'CPU s':>8s}")
    cli_name = "quantkit quantize" + (f" --strategy {args.strategy}" if args.strategy != "default" else "")
    print(f"{cli_name:34s} {row['cli']['wall_s']:8.2f} {row['cli']['cpu_s']:8.2f}")
    if "cli_no_checkpoint" in row:
        print(f"{'quantkit quantize --no-checkpoint':34s} {row['cli_no_checkpoint']['wall_s']:8.2f} "
              f"{row['cli_no_checkpoint']['cpu_s']:8.2f}")
    if "cli_bf16" in row:
        print(f"{'quantkit quantize --dtype bfloat16':34s} {row['cli_bf16']['wall_s']:8.2f} "
              f"{row['cli_bf16']['cpu_s']:8.2f}")
    if "core" in row:
        print(f"{'quantize_model (in memory)':34s} {row['core']['seconds']:8.2f} "
              f"{row['core']['cpu_seconds']:8.2f}")
    if "mlx_lm" in row:
        ml, ml_cpu = row["mlx_lm"].get("seconds"), row["mlx_lm"].get("cpu_seconds")
        print(f"{'mlx-lm gptq_quantize':34s} {ml if ml is None else f'{ml:8.2f}'} "
              f"{ml_cpu if ml_cpu is None else f'{ml_cpu:8.2f}'}")
        if ml:
            row["speedup_vs_mlx_lm"] = ml / row["cli"]["wall_s"]
        if ml_cpu:
            row["speedup_vs_mlx_lm_cpu"] = ml_cpu / row["cli"]["cpu_s"]
            print(f"mlx-lm / quantkit (defaults): {row['speedup_vs_mlx_lm']:.2f}x wall, "
                  f"{row['speedup_vs_mlx_lm_cpu']:.2f}x CPU seconds")
    print("phases of the default CLI run: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row["cli"]["phases_s"].items()))
    if "checkpoint_ratio" in row:
        print(f"checkpoint cost: defaults / --no-checkpoint = {row['checkpoint_ratio']:.3f}x")
    for key in ("cli", "cli_no_checkpoint", "cli_bf16"):
        if key in row:
            print(f"{key}: peak memory {row[key]['peak_memory_gb']} GB, mean relative error "
                  f"{row[key]['mean_relative_error']}")
    path = args.json or REPO / "benchmarks" / "results" / (
        f"job_{args.model}_{args.samples}x{args.seq_len}_{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
