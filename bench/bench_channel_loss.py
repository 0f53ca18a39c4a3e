"""Step time with channel loss on vs off, inside one training run.

One ``ChannelLossTrainer`` run alternates blocks of optimizer steps with channel loss on and off (the trainer's
``channel_loss_enabled`` switch), so both modes share the model, the data, the allocator state and whatever else the
machine is doing; the overhead is the median ratio of adjacent on/off steps (the ratio of the median step times is
reported too). "Off" is stock ``transformers`` (the model
computes its own loss); "on" computes per-token losses once, attributes them to channels and, at every log, reduces
the window with one all_reduce (``--logging-steps 1`` by default: the worst case, a collective every step).

A step is timed from one ``on_step_begin`` to the next, so logging (and the reduction) is inside it. The isolated
cost of ``ChannelLossAccumulator.add`` per micro-batch is measured too, as a noise-free lower bound.

    python bench/bench_channel_loss.py                      # CPU, ~2 minutes
    torchrun --nproc_per_node 2 bench/bench_channel_loss.py --steps 40   # with the all_reduce over gloo/NCCL
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _samples(n, vocab, lo, hi, channels, seed):
    """Random conversations as token ids: a prompt half (masked) and a reply half (supervised)."""
    from launch.sft_data import TokenizedSample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(TokenizedSample(ids, [-100] * cut + ids[cut:], f"ch{i % channels}", f"bench:{i}"))
    return out


class _StepTimer:
    """Times whole loop iterations and flips channel loss every ``block`` steps after ``warmup`` steps."""

    def __init__(self, block, warmup):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                now = time.perf_counter()
                if timer.last is not None and state.global_step > warmup:
                    timer.times[timer.mode].append(now - timer.last)
                    timer.sequence.append((timer.mode, now - timer.last))
                timer.last = now
                k = max(0, state.global_step - warmup)
                timer.mode = "on" if (k // block) % 2 == 0 else "off"
                timer.trainer.channel_loss_enabled = timer.mode == "on"

        self.callback = Callback()
        self.times = {"on": [], "off": []}
        self.sequence: list[tuple[str, float]] = []
        self.last = None
        self.mode = "on"
        self.trainer = None


def _accumulator_cost(trainer, batch_rows, seq, vocab, repeats=200):
    """Seconds per ChannelLossAccumulator.add on a micro-batch of the bench's shape."""
    acc = trainer._channel_train
    loss = torch.rand(batch_rows, seq - 1, device=acc.sums.device)
    chan = torch.randint(0, len(acc.index), (batch_rows, seq - 1), device=acc.sums.device)
    mask = torch.rand(batch_rows, seq - 1, device=acc.sums.device) > 0.5
    for _ in range(10):
        acc.add(loss, chan, mask)
    if acc.sums.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        acc.add(loss, chan, mask)
    if acc.sums.is_cuda:
        torch.cuda.synchronize()
    acc.sums.zero_()
    return (time.perf_counter() - t) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=44, help="timed optimizer steps, after the warm-up (default 44)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    p.add_argument("--block", type=int, default=1, help="steps per on/off block (default 1: alternate every step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512, help="packed row length (default 512)")
    p.add_argument("--batch", type=int, default=2, help="rows per micro-batch (default 2)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from launch.sft_packing import SFTCollator, SFTDataset
    from patches.channel_loss import build_index
    from patches.hf_trainer_channel_loss import ChannelLossTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = args.warmup + args.steps + 1
    rows_needed = total * args.batch * args.grad_accum * world
    samples = _samples(rows_needed * 4, args.vocab, args.seq // 8, args.seq // 3, args.channels, seed=0)
    index = build_index([s.channel for s in samples])
    dataset = SFTDataset(samples, index, args.seq, packing=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    has_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=total, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.grad_accum, learning_rate=1e-4, logging_steps=args.logging_steps,
            report_to=[], save_strategy="no", use_cpu=not has_gpu, bf16=has_gpu, disable_tqdm=True,
            remove_unused_columns=False, dataloader_pin_memory=False, ddp_find_unused_parameters=False,
        )
        timer = _StepTimer(args.block, args.warmup)
        trainer = ChannelLossTrainer(
            model=model, args=targs, train_dataset=dataset, data_collator=SFTCollator(0, packing=True),
            channel_index=index, callbacks=[timer.callback],
        )
        timer.trainer = trainer
        trainer.train()
        add_cost = _accumulator_cost(trainer, args.batch, args.seq, args.vocab)

    if targs.process_index != 0:
        return 0
    on, off = statistics.median(timer.times["on"]), statistics.median(timer.times["off"])
    # Adjacent on/off steps share the machine's momentary load (other jobs, thermal state): the median of their
    # ratios is the figure least moved by a busy machine.
    seq = timer.sequence
    ratios = [a[1] / b[1] if a[0] == "on" else b[1] / a[1] for a, b in zip(seq, seq[1:]) if a[0] != b[0]]
    paired = statistics.median(ratios) - 1
    result = {
        "device": torch.cuda.get_device_name() if has_gpu else f"cpu x{torch.get_num_threads()} threads",
        "world_size": world,
        "shape": f"llama h{args.hidden} L{args.layers} V{args.vocab}, {args.batch}x{args.seq} packed, "
                 f"GA {args.grad_accum}, {args.channels} channels, log every {args.logging_steps} step(s)",
        "steps_on": len(timer.times["on"]),
        "steps_off": len(timer.times["off"]),
        "median_step_s_on": round(on, 4),
        "median_step_s_off": round(off, 4),
        "overhead_pct": round(100 * paired, 2),
        "overhead_pct_of_medians": round(100 * (on / off - 1), 2),
        "min_step_s_on": round(min(timer.times["on"]), 4),
        "min_step_s_off": round(min(timer.times["off"]), 4),
        "adjacent_pairs": len(ratios),
        "accumulator_add_ms_per_micro_batch": round(add_cost * 1e3, 4),
        "accumulator_pct_of_step": round(100 * add_cost * args.grad_accum / off, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"channel loss overhead: {result['overhead_pct']:+.2f}% step time "
          f"(median {on:.3f} s on vs {off:.3f} s off; accumulator alone {result['accumulator_pct_of_step']:.3f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
