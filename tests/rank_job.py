"""A rank for tests/test_distributed.py, run by the local launcher.

``rank_job.py MODEL OUT TEXT ok|kill|hang|distill``: quantizes like the CLI (``distill``:
with the recipe :data:`DISTILL`), with tiny all_gather
slices (4 KiB) so statistics and layers travel in many pieces; with ``kill`` or ``hang``, rank 1
kills itself (SIGKILL: no cleanup, no message) or stops making progress at block 2.

``rank_job.py - OUT - moe``: quantizes the tiny mixtral whose expert 3 gets no tokens, in
expert batches of 3 (two unequal batches per layer), and rank 0 writes ``OUT`` (JSON: the
digest of the quantized parameters and the run report); see :func:`moe_digest`."""

import hashlib
import json
import os
import signal
import sys
import time

import attrs
import mlx.core as mx
from mlx.utils import tree_flatten

from quantkit import Recipe, quantize_directory, quantize_model
from quantkit.distributed import Distributed

#: ``distill`` mode's recipe: GPTQ, then end-to-end distillation (a step of 2 sequences).
DISTILL = Recipe.from_dict({"default": {"strategy": "gptq", "bits": 4, "group_size": 32},
                            "distill": {"lr": 3e-5}})


def moe_digest(group: Distributed) -> dict:
    """Quantize the tiny mixtral without expert 3 (see tests/test_moe.py) with ``group``."""
    from test_moe import RECIPE, mixtral_without_expert_3, registry_with, tokens

    model = mixtral_without_expert_3()
    result = quantize_model(model, tokens(4, 32), RECIPE, batch_size=1, distributed=group,
                            registry=registry_with(expert_batch_size=3))
    h = hashlib.sha256()
    for name, value in tree_flatten(model.parameters()):
        h.update(name.encode())
        h.update(bytes(memoryview(mx.contiguous(value).reshape(-1).view(mx.uint8))))
    return {"digest": h.hexdigest(), "report": result.report.to_dict()}


def main() -> int:
    from quantkit.cli import _give_up

    model_dir, out_dir, text, mode = sys.argv[1:5]
    group = Distributed.init(strict=True, num_shards=4, chunk_bytes=4096, timeout_s=60,
                             on_timeout=_give_up)
    if mode == "hang":  # connecting may take longer on a busy machine; collectives may not
        group = attrs.evolve(group, timeout_s=3)

    def progress(event, info):
        if mode in ("kill", "hang") and group.rank == 1 and event == "block" \
                and info["index"] == 2:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)

    try:
        if mode == "moe":
            got = moe_digest(group)
            if group.rank == 0:
                with open(out_dir, "w") as f:
                    json.dump(got, f)
            return 0
        quantize_directory(model_dir, out_dir, DISTILL if mode == "distill" else Recipe.uniform("gptq", 4, 32),
                           calibration=text, num_samples=16, seq_len=128, progress=progress,
                           distributed=group)
    except Exception as exc:  # the surviving rank: a DistributedError
        print(f"rank {group.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
