"""Pretraining data for the Trainer: raw-text JSONL -> tokens -> fixed blocks that keep every token's channel.

What it does:

* ``scan_jsonl``: one streaming pass over each file before anything else, so malformed JSON, a missing or non-text
  ``text`` and a channel of the wrong type stop the run with ``file:line`` before tokenization or training starts.
  Empty texts are counted and skipped (reported, never silently). The pass also fingerprints the bytes it read, which
  keys the ``datasets`` cache: a file rewritten in place is tokenized again, never served stale.
* ``tokenize_texts``: ``datasets.map`` in parallel worker processes (cached on disk), EOS appended to every text, one
  channel id per text.
* ``PackedBlocks``: the token stream of all texts, concatenated in file order, cut into blocks of ``block_size``
  tokens. Blocks are views computed from cumulative lengths, not a second materialized copy, so the concatenation is
  exact over the whole stream (no remainder dropped per map batch). The incomplete tail block is dropped and its
  token count reported. Each block carries ``channel_ids`` per token, so a block that spans sources attributes each
  token's loss to its own channel.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from launch.jsonl_records import jsonl_objects
from launch.sft_data import _channel_of
from patches.channel_loss import DEFAULT_CHANNEL, ChannelIndex

REMAINDER_POLICY = (
    "texts are concatenated in file order (EOS after each) and cut into blocks of --block-size tokens; the last, "
    "incomplete block is dropped and its token count printed (attention spans texts inside a block, as in the usual "
    "run_clm recipe and Megatron's default)"
)


@dataclass
class TextReport:
    """What one file holds, found by the validation pass and printed before training."""

    path: str
    num_texts: int = 0
    num_empty: int = 0
    num_bytes: int = 0
    empty_lines: list[int] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    truncated: bool = False  # stopped at the smoke limit
    slice_bytes: int = 0  # bytes of the lines read (the whole file unless truncated)
    named_channels: bool = False  # some line has a channel field

    def lines(self) -> list[str]:
        head = f"{self.path}: {self.num_texts} texts"
        if self.truncated:
            head += " (smoke slice: the first texts only)"
        out = [head]
        if self.num_empty:
            shown = ", ".join(str(n) for n in self.empty_lines[:5]) + (" ..." if self.num_empty > 5 else "")
            out.append(f"  {self.num_empty} empty texts skipped (lines {shown})")
        for name, count in sorted(self.channels.items()):
            out.append(f"  channel {name!r}: {count} texts")
        return out


def _text_of(record, text_field: str, where: str) -> str:
    if text_field not in record:
        raise ValueError(
            f"{where}: record has keys {sorted(record)}, no {text_field!r}; each line must be "
            f'{{"{text_field}": "...", "channel": "..."}} (or pass --text-field)'
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__} {value!r:.60}; it must be a string")
    return value


def _records(path: str, text_field: str, channel_field: str) -> Iterator[tuple[int, str, str | None]]:
    """``(line number, text, channel)`` for every non-blank line; bad lines raise with ``path:line``."""
    for lineno, where, record in jsonl_objects(path):
        yield lineno, _text_of(record, text_field, where), _channel_of(record, channel_field, where)


def scan_jsonl(path: str, text_field: str = "text", channel_field: str = "channel",
               limit: int | None = None) -> TextReport:
    """Validate ``path`` line by line and count its texts per channel (the first ``limit`` texts when given).

    Raises:
        ValueError: missing file, a bad line (``path:line``), or no text at all.
    """
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; pass a JSONL file with one {{\"text\": ...}} per line")
    report = TextReport(path=path, num_bytes=os.path.getsize(path))
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    report.fingerprint = digest.hexdigest()
    for lineno, text, channel in _records(path, text_field, channel_field):
        if limit is not None and report.num_texts >= limit:
            report.truncated = True
            break
        report.named_channels |= channel is not None
        if not text.strip():
            report.num_empty += 1
            report.empty_lines.append(lineno)
            continue
        report.num_texts += 1
        name = DEFAULT_CHANNEL if channel is None else channel
        report.channels[name] = report.channels.get(name, 0) + 1
    if report.num_texts == 0:
        raise ValueError(f"data file {path!r} holds no non-empty text ({report.num_empty} empty); nothing to train on")
    return report


def _generate(paths: Sequence[str], text_field: str, channel_field: str, limits: Sequence[int | None],
              fingerprints: Sequence[str]):
    """Rows for ``datasets.Dataset.from_generator``; ``fingerprints`` is unused here but keys the cache."""
    del fingerprints
    for path, limit in zip(paths, limits):
        taken = 0
        for _lineno, text, channel in _records(path, text_field, channel_field):
            if limit is not None and taken >= limit:
                break
            if text.strip():
                taken += 1
                yield {"text": text, "channel": DEFAULT_CHANNEL if channel is None else channel}


def _tokenize_batch(batch, tokenizer, channel_ids: dict, add_special_tokens: bool):
    ids = tokenizer(batch["text"], add_special_tokens=add_special_tokens)["input_ids"]
    eos = tokenizer.eos_token_id
    input_ids = [list(x) + [eos] for x in ids]
    return {
        "input_ids": input_ids,
        "length": [len(x) for x in input_ids],
        "channel_id": [channel_ids[c] for c in batch["channel"]],
    }


def tokenize_texts(reports: Sequence[TextReport], tokenizer, index: ChannelIndex, *, text_field: str = "text",
                   channel_field: str = "channel", num_proc: int | None = None, cache_dir: str | None = None,
                   add_special_tokens: bool = False):
    """Tokenize the texts of ``reports`` (already validated) into a cached ``datasets.Dataset``.

    Columns: ``input_ids`` (EOS appended), ``length`` and ``channel_id``, one row per non-empty text, in file order.
    """
    import datasets

    paths = [r.path for r in reports]
    limits = [r.num_texts if r.truncated else None for r in reports]
    raw = datasets.Dataset.from_generator(
        _generate,
        gen_kwargs={"paths": paths, "text_field": text_field, "channel_field": channel_field, "limits": limits,
                    "fingerprints": [r.fingerprint for r in reports]},
        cache_dir=cache_dir,
    )
    return raw.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=raw.column_names,
        fn_kwargs={"tokenizer": tokenizer, "channel_ids": {n: index.id(n) for n in index.names},
                   "add_special_tokens": add_special_tokens},
        desc="tokenizing",
    )


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed blocks of ``block_size`` tokens over the concatenated token stream, each token with its channel id.

    Args:
        tokenized: the output of ``tokenize_texts``.
        block_size: tokens per block.
    """

    def __init__(self, tokenized, block_size: int):
        self.tokenized = tokenized
        self.block_size = block_size
        self.lengths = np.asarray(tokenized["length"], dtype=np.int64)
        self.ends = np.cumsum(self.lengths)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.num_blocks = self.num_tokens // block_size
        self.dropped_tokens = self.num_tokens - self.num_blocks * block_size

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range [0, {self.num_blocks})")
        start, stop = i * self.block_size, (i + 1) * self.block_size
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, stop - 1, side="right"))
        rows = self.tokenized[first:last + 1]
        input_ids: list[int] = []
        channel_ids: list[int] = []
        for ids, channel in zip(rows["input_ids"], rows["channel_id"]):
            input_ids += ids
            channel_ids += [channel] * len(ids)
        offset = start - int(self.ends[first] - self.lengths[first])
        end = offset + self.block_size
        return {"input_ids": input_ids[offset:end], "channel_ids": channel_ids[offset:end]}

    def channel_token_counts(self, index: ChannelIndex) -> dict[str, int]:
        """Tokens per channel over the whole blocks (the dropped tail excluded), for the start-up report."""
        kept = self.num_blocks * self.block_size
        channel = np.asarray(self.tokenized["channel_id"], dtype=np.int64)
        starts = self.ends - self.lengths
        inside = np.clip(np.minimum(self.ends, kept) - starts, 0, None)
        counts = np.bincount(channel, weights=inside, minlength=len(index))
        return {name: int(counts[i]) for i, name in enumerate(index.names)}


def collate_blocks(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; every position is a target (the causal shift happens in the loss)."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "channel_ids": torch.tensor([f["channel_ids"] for f in features], dtype=torch.long),
    }
