"""Shared by the pretraining and DeepSpeed tests: raw-text data whose blocks span channels, an independent block and
loss recomputation (no code under test), a torchrun runner for any ``launch`` module, and event-file reading."""
from __future__ import annotations

import glob
import json
import os
import random

import torch

import _sft_helpers
from _sft_helpers import sentence

CHANNELS = ("chat", "code", "math")


def write_texts(path: str, tok, block: int, blocks: int, seed: int) -> list[dict]:
    """Texts from 3 channels in a fixed random order, 4-20 words each, making exactly ``blocks`` whole blocks of
    ``block`` tokens (EOS included) plus a tail of at least half a block (which is dropped)."""
    rng = random.Random(seed)
    records, total = [], 0
    while total < blocks * block + block // 2:
        channel = rng.choice(CHANNELS)
        record = {"text": sentence(rng, channel, 4, 20), "channel": channel}
        n = len(tok.encode(record["text"], add_special_tokens=False)) + 1
        if total + n >= (blocks + 1) * block:
            continue
        records.append(record)
        total += n
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def reference_blocks(tok, records: list[dict], block: int) -> list[tuple[list[int], list[str]]]:
    """Text + EOS, concatenated in order, cut into whole blocks: ``[(token ids, channel per token)]``."""
    ids, channels = [], []
    for r in records:
        piece = tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
        ids += piece
        channels += [r["channel"]] * len(piece)
    return [(ids[i:i + block], channels[i:i + block]) for i in range(0, len(ids) - block + 1, block)]


@torch.no_grad()
def block_channel_sums(model_dir: str, blocks) -> dict[str, list]:
    """``{channel: [loss_sum, tokens]}``: every block run through the model; the loss of predicting token t+1 counts
    for the channel of token t+1 (its own source)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, list] = {}
    for ids, channels in blocks:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        for loss, channel in zip(losses.tolist(), channels[1:]):
            acc = sums.setdefault(channel, [0.0, 0])
            acc[0] += loss
            acc[1] += 1
    return sums


def merge(into: dict, more: dict) -> dict:
    for name, (s, n) in more.items():
        acc = into.setdefault(name, [0.0, 0])
        acc[0] += s
        acc[1] += n
    return into


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file under ``run_dir/runs``; a channel or loss curve written twice at
    one step is an error (it would mean a window logged twice across a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    files = glob.glob(os.path.join(run_dir, "runs", "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {run_dir}/runs"
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = out.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if "channel_" in tag or tag == "train/loss":
                    assert e.step not in series, f"{tag} written twice at step {e.step}"
                series[e.step] = e.value
    return out


def torchrun(module: str, args: list[str], nproc: int = 2, timeout: int = 420) -> str:
    """``torchrun --standalone --nproc_per_node nproc -m <module> ...`` on CPU (gloo); returns stdout + stderr."""
    proc = _sft_helpers.torchrun(args, nproc=nproc, timeout=timeout, module=module)
    return proc.stdout + proc.stderr


def expected_windows(run_dir: str, initial: str, blocks, blocks_per_step: int, steps: int, log_every: int):
    """Per logging window, ``{channel: [loss_sum, tokens]}`` recomputed from the states in force at each step: the
    initial model for step 1, then the checkpoint the run saved after step s-1 (``checkpoint-<s-1>``)."""
    windows: dict[int, dict] = {}
    for step in range(1, steps + 1):
        state = initial if step == 1 else os.path.join(run_dir, f"checkpoint-{step - 1}")
        step_blocks = blocks[(step - 1) * blocks_per_step: step * blocks_per_step]
        merge(windows.setdefault(((step - 1) // log_every + 1) * log_every, {}), block_channel_sums(state, step_blocks))
    return windows


def assert_windows_match(scalars, windows, tol: float = 1e-5, prefix: str = "") -> None:
    """Logged ``channel_loss``/``channel_tokens`` equal the recomputation at every window; absent channels unlogged."""
    for log_step, sums in windows.items():
        for name in CHANNELS:
            logged = scalars.get(f"{prefix}channel_loss/{name}", {})
            if name not in sums:
                assert log_step not in logged, f"{name} absent from the window ending at {log_step} yet logged"
                continue
            s, n = sums[name]
            assert abs(logged[log_step] - s / n) <= tol, (name, log_step, logged[log_step], s / n)
            assert scalars[f"{prefix}channel_tokens/{name}"][log_step] == n, (name, log_step)
