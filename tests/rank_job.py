"""A rank for tests/test_distributed.py, run by the local launcher:
``rank_job.py MODEL OUT TEXT ok|kill|hang``. Quantizes like the CLI, with tiny all_gather
slices (4 KiB) so statistics and layers travel in many pieces; with ``kill`` or ``hang``, rank 1
kills itself (SIGKILL: no cleanup, no message) or stops making progress at block 2."""

import os
import signal
import sys
import time

from quantkit import Recipe, quantize_directory
from quantkit.distributed import Distributed


def main() -> int:
    from quantkit.cli import _give_up

    model_dir, out_dir, text, mode = sys.argv[1:5]
    group = Distributed.init(strict=True, num_shards=4, chunk_bytes=4096,
                             timeout_s=3 if mode == "hang" else 60,
                             on_timeout=_give_up)

    def progress(event, info):
        if mode != "ok" and group.rank == 1 and event == "block" and info["index"] == 2:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)

    try:
        quantize_directory(model_dir, out_dir, Recipe.uniform("gptq", 4, 32), calibration=text,
                           num_samples=16, seq_len=128, progress=progress, distributed=group)
    except Exception as exc:  # the surviving rank: a DistributedError
        print(f"rank {group.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
