"""Run ``launch.pretrain_gpt`` with its collectives recorded (a test instrument, one JSON file per rank).

Every call of a torch.distributed collective is wrapped; a call is attributed to channel loss when the channel-loss
modules are on the Python stack, and counted as inside a micro-batch when the schedule's ``forward_step`` or the
loss function is on the stack.
"""
import functools
import json
import os
import sys
import traceback

import torch.distributed as dist

CHANNEL_MODULES = (os.path.join("patches", "channel_loss.py"), os.path.join("patches", "megatron_channel_loss.py"))
MICRO_BATCH_FRAMES = ("forward_step", "forward_step_calc_loss", "loss_func")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")

calls = []


def _wrap(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        files = [f.filename for f in stack]
        calls.append({
            "op": name,
            "channel": any(f.endswith(m) for f in files for m in CHANNEL_MODULES),
            "in_micro_batch": any(f.name in MICRO_BATCH_FRAMES for f in stack),
            "shape": list(args[0].shape) if args and hasattr(args[0], "shape") else None,
        })
        return fn(*args, **kwargs)
    return wrapper


for _name in COLLECTIVES:
    setattr(dist, _name, _wrap(_name, getattr(dist, _name)))


def main():
    from launch.pretrain_gpt import main as pretrain_main

    rank = os.environ.get("RANK", "0")
    try:
        return pretrain_main(sys.argv[1:])
    finally:
        with open(os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.json"), "w") as f:
            json.dump(calls, f)


if __name__ == "__main__":
    os.makedirs(os.environ["PROBE_DIR"], exist_ok=True)
    sys.exit(main())
