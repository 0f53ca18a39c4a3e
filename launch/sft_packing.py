"""SFT rows and batches: optional packing of several samples into one sequence, and the collator.

What it does:

* ``next_fit_pack``: groups samples, in data order, into rows of at most ``max_length`` tokens. Next-fit keeps the
  data order (curricula and the channel layout of the file survive) and is predictable; rows are shuffled later by
  the sampler like unpacked samples.
* ``SFTDataset``: one item per row with ``input_ids``, ``labels``, ``position_ids`` restarting at 0 in every packed
  sub-sample, and per token the ``channel_ids`` and ``sample_ids`` that channel loss needs. The label of each
  sub-sample's first token is masked, so no loss is taken across a sample boundary.
* ``SFTCollator``: pads a batch. Packed batches carry ``position_ids`` and no ``attention_mask``: from restarting
  positions ``transformers`` builds a block-diagonal causal mask (sdpa, eager) or varlen boundaries (flash attention),
  so attention never crosses a sub-sample boundary. That detection is skipped when the model builds a KV cache, so
  packed batches must run with ``use_cache=False`` (the Trainer's default, ``TrainingArguments.use_cache``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from launch.sft_data import TokenizedSample
from patches.channel_loss import DEFAULT_CHANNEL, IGNORE_INDEX, ChannelIndex


def next_fit_pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices, in order, into rows whose total length is at most ``max_length``.

    A sample is never split: samples are already truncated to ``max_length``, so each fits in a row of its own.
    """
    rows: list[list[int]] = []
    used = max_length + 1  # forces a new row for the first sample
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(
                f"sample {i} has {n} tokens, over max_length={max_length}; truncate samples before packing"
            )
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class SFTDataset(torch.utils.data.Dataset):
    """Rows of one or more tokenized samples, with the per-token fields channel loss needs.

    Args:
        samples: tokenized samples, already truncated to ``max_length``.
        index: the channel index fixed at start-up.
        max_length: row length limit when packing.
        packing: put several samples in one row.
    """

    def __init__(self, samples: Sequence[TokenizedSample], index: ChannelIndex, max_length: int, packing: bool):
        self.samples = list(samples)
        self.packing = packing
        self.channel_of = [index.id(DEFAULT_CHANNEL if s.channel is None else s.channel) for s in self.samples]
        if packing:
            self.rows = next_fit_pack([len(s.input_ids) for s in self.samples], max_length)
        else:
            self.rows = [[i] for i in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        input_ids, labels, position_ids, channel_ids, sample_ids = [], [], [], [], []
        for k, s in enumerate(self.rows[i]):
            sample = self.samples[s]
            n = len(sample.input_ids)
            input_ids += sample.input_ids
            # The first token of a sub-sample would be predicted from the previous sub-sample's last token.
            labels += [IGNORE_INDEX] + sample.labels[1:]
            position_ids += range(n)
            channel_ids += [self.channel_of[s]] * n
            sample_ids += [k] * n
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "channel_ids": channel_ids,
            "sample_ids": sample_ids,
        }


class SFTCollator:
    """Right-pads a list of rows into tensors.

    Args:
        pad_token_id: id written at padded positions (never attended to nor learned).
        packing: emit ``position_ids`` without ``attention_mask`` (packed rows) instead of an ``attention_mask``.
        with_channels: emit ``channel_ids`` and ``sample_ids`` (``-1`` at padding; sample ids unique in the batch).
        pad_to_multiple_of: round the padded length up, for tensor-core friendly shapes.
    """

    def __init__(self, pad_token_id: int, packing: bool, with_channels: bool = True, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.with_channels = with_channels
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        # Padding gets positions 0.. of its own, so in packed mode it reads as one more (unsupervised) segment.
        position_ids = torch.arange(width, dtype=torch.long).repeat(batch, 1)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        channel_ids = torch.full((batch, width), -1, dtype=torch.long)
        sample_ids = torch.full((batch, width), -1, dtype=torch.long)
        next_sample = 0
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[b, :n] = torch.tensor(f["input_ids"])
            labels[b, :n] = torch.tensor(f["labels"])
            position_ids[b, :n] = torch.tensor(f["position_ids"])
            position_ids[b, n:] = torch.arange(width - n)
            attention_mask[b, :n] = 1
            channel_ids[b, :n] = torch.tensor(f["channel_ids"])
            sample_ids[b, :n] = torch.tensor(f["sample_ids"]) + next_sample
            next_sample += max(f["sample_ids"]) + 1
        out = {"input_ids": input_ids, "labels": labels}
        if self.packing:
            out["position_ids"] = position_ids
        else:
            out["attention_mask"] = attention_mask
        if self.with_channels:
            out["channel_ids"] = channel_ids
            out["sample_ids"] = sample_ids
        return out
