"""Building blocks for the pretrain_gpt tests: channel data, runs (torchrun or one process), the HF reference.

The reference never touches the code under test: it runs `transformers`' LlamaForCausalLM on token ids, takes the
per-token cross entropy in float64 and sums it per channel before dividing once.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each channel draws its tokens from its own id range, so a token's channel is known without the code under test.
CHANNEL_RANGES = {"code": (0, 80), "math": (80, 160), "chat": (160, 256)}
VOCAB = 256  # a multiple of 128 x TP for TP in {1, 2}: no padded logits, so Megatron's softmax is Hugging Face's


def channel_of_token(token: int) -> str:
    return next(name for name, (lo, hi) in CHANNEL_RANGES.items() if lo <= token < hi)


def write_indexed(prefix: str, channel: str, docs: int, seed: int) -> str:
    """A Megatron .bin/.idx pair of random documents drawn from ``channel``'s id range."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lo, hi = CHANNEL_RANGES[channel]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(docs):
        n = int(rng.integers(10, 40))
        builder.add_document(torch.tensor(rng.integers(lo, hi, n), dtype=torch.int32), [n])
    builder.finalize(prefix + ".idx")
    return prefix


def sft_record(rng: random.Random, channel: str, n: int, prompt: int) -> dict:
    """A pre-tokenized record of ``n`` ids with the first ``prompt`` unsupervised."""
    lo, hi = CHANNEL_RANGES[channel]
    ids = [rng.randrange(lo, hi) for _ in range(n)]
    return {"input_ids": ids, "loss_mask": [0] * prompt + [1] * (n - prompt), "channel": channel}


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def run(args: list[str], nproc: int = 1, timeout: int = 300, probe_dir: str | None = None) -> str:
    """``launch.pretrain_gpt`` under torchrun (``nproc`` > 1) or as one plain process; returns the output.

    With ``probe_dir`` every rank runs under ``tests/_collective_probe.py``, which records the collectives."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    target = [os.path.join(REPO, "tests", "_collective_probe.py")] if probe_dir else ["-m", "launch.pretrain_gpt"]
    if probe_dir:
        env["PROBE_DIR"] = probe_dir
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]
    else:
        cmd = [sys.executable, *target]
    proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"pretrain_gpt hung for {timeout} s:\n{out[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"pretrain_gpt failed ({proc.returncode}):\n{out[-8000:]}")
    return out


def read_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    files = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {run_dir}"
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def read_dump(dump_dir: str) -> tuple[list[str], list[dict]]:
    """(channel names, every dumped micro-batch of every DP rank)."""
    names, batches = None, []
    paths = sorted(glob.glob(os.path.join(dump_dir, "*.pt")))
    assert paths, f"no batch dump under {dump_dir}"
    for path in paths:
        d = torch.load(path)
        assert names is None or names == d["channels"]
        names = d["channels"]
        batches += d["batches"]
    return names, batches


class Reference:
    """The Hugging Face model's per-token losses, summed per channel."""

    def __init__(self, hf_dir: str):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def token_losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` float64 cross entropy of ``labels`` given ``tokens`` (plain causal attention, row by row)."""
        logits = self.model(input_ids=tokens).logits.double()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")

    def add_rows(self, sums: dict, tokens, labels, mask, channel_per_token) -> None:
        """Add rows whose tokens' channels are given by ``channel_per_token(token_id) -> name``."""
        losses = self.token_losses(tokens, labels)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                if mask[b, t]:
                    acc = sums.setdefault(channel_per_token(int(labels[b, t])), [0.0, 0])
                    acc[0] += float(losses[b, t])
                    acc[1] += 1

    def add_sample(self, sums: dict, record: dict) -> None:
        """One pre-tokenized record alone: predict ids[t+1] from ids[:t+1] where loss_mask[t+1] is set."""
        ids = torch.tensor([record["input_ids"]])
        mask = torch.tensor([record["loss_mask"][1:]], dtype=torch.bool)
        losses = self.token_losses(ids[:, :-1], ids[:, 1:])
        acc = sums.setdefault(record["channel"], [0.0, 0])
        acc[0] += float(losses[mask].sum())
        acc[1] += int(mask.sum())
