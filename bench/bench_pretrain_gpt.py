"""Benchmark ``launch.pretrain_gpt``: channel-loss overhead per step, and tokens/s on CPU at TP=1 and TP=2.

    python bench/bench_pretrain_gpt.py [--rounds 6] [--steps 4] [--seq-length 256] [--hidden 256]

For each TP it starts one run (torchrun, gloo) of a small Llama-shaped model built from flags, on synthetic
pre-tokenized data with three channels, and alternates blocks of steps with the channel accounting on and off inside
that one run (the order flips every round), so machine noise hits both sides alike. It prints the median step time
of each side, the overhead, and tokens/s. Numbers are machine figures: nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(path: str, vocab: int, seq: int, n: int = 256) -> str:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            ids = [rng.randrange(vocab) for _ in range(seq + 1)]
            f.write(json.dumps({"input_ids": ids, "channel": ("code", "math", "chat")[i % 3]}) + "\n")
    return path


def worker(a: argparse.Namespace) -> None:
    """One run: alternate channel loss on/off in blocks of ``steps``; rank 0 writes the timings as JSON."""
    sys.path.insert(0, REPO)
    import torch.distributed as dist

    from launch.pretrain_gpt import Trainer, build_parser, init_distributed, plan_run

    flags = ["--tp", str(a.tp), "--sft-data", a.data, "--seq-length", str(a.seq_length),
             "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.micro_batch_size),
             "--train-iters", "100000", "--lr", "1e-4", "--log-interval", "100000", "--num-layers", str(a.layers),
             "--hidden-size", str(a.hidden), "--num-attention-heads", "8", "--vocab-size", str(a.vocab),
             "--max-position-embeddings", str(a.seq_length)]
    plan = plan_run(build_parser().parse_args(flags))
    init_distributed()
    trainer = Trainer(plan)
    trainer.build_datasets()
    iterator = trainer.iterators(trainer.train_rows, 0)
    for _ in range(2):  # warm-up: allocator, first-call paths
        trainer.train_step(iterator)
    times = {True: [], False: []}
    for r in range(a.rounds):
        for enabled in ((True, False) if r % 2 == 0 else (False, True)):
            trainer.channel_loss.enabled = enabled
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainer.train_step(iterator)
            dist.barrier()
            times[enabled].append((time.perf_counter() - t0) / a.steps)
    trainer.reduce_window()  # the window's one collective, as at a log step
    # The accounting alone, per micro-batch, on a micro-batch's shape (what the on/off difference hides in noise).
    import torch

    shape = (a.micro_batch_size, a.seq_length)
    losses, mask = torch.rand(shape), torch.ones(shape)
    channels = torch.randint(0, len(plan.channels), shape)
    trainer.channel_loss.enabled = True
    t0 = time.perf_counter()
    for _ in range(200):
        trainer.channel_loss.add(losses, channels, mask)
    add_s = (time.perf_counter() - t0) / 200
    micro_batches = plan.num_microbatches
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump({"on": times[True], "off": times[False], "add_s": add_s * micro_batches,
                       "tokens_per_step": a.micro_batch_size * plan.dp * a.seq_length}, f)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="on/off pairs of blocks")
    p.add_argument("--steps", type=int, default=4, help="steps per block")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tps", default="1,2", help="tensor-parallel sizes to run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(os.path.join(tmp, "data.jsonl"), a.vocab, a.seq_length)
        for tp in (int(t) for t in a.tps.split(",")):
            out = os.path.join(tmp, f"tp{tp}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp),
                   __file__, "--worker", "--tp", str(tp), "--data", data, "--out", out,
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                     if k in ("rounds", "steps", "seq_length", "micro_batch_size", "hidden", "layers", "vocab")]]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
                       PYTHONPATH=REPO)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-6000:])
                return 1
            with open(out) as f:
                r = json.load(f)
            on, off = statistics.median(r["on"]), statistics.median(r["off"])
            rows.append((tp, on, off, 100 * (on - off) / off, 100 * r["add_s"] / off, r["tokens_per_step"] / on))
    print(f"model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; seq {a.seq_length} x micro-batch "
          f"{a.micro_batch_size}; {a.rounds} rounds x {a.steps} steps per side, alternated in one run")
    print(f"{'TP':>3} {'step on (ms)':>13} {'step off (ms)':>14} {'overhead':>9} {'accounting alone':>17} "
          f"{'tokens/s (on)':>14}")
    for tp, on, off, pct, alone, tps in rows:
        print(f"{tp:>3} {on * 1000:>13.1f} {off * 1000:>14.1f} {pct:>8.2f}% {alone:>16.3f}% {tps:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
