"""Data for ``launch.pretrain_gpt``: every batch carries a channel id per token.

Three sources, one batch shape (``[micro_batch, seq_length]`` each: ``tokens``, ``labels``, ``loss_mask``,
``channel_ids``, ``segment_ids``; Megatron's shifted convention, ``labels[t]`` is the token after ``tokens[t]``):

* Megatron indexed datasets and weighted blends (``--data-path W1 PREFIX1 W2 PREFIX2``), through
  ``megatron.core.datasets`` (``BlendedMegatronDatasetBuilder`` + ``GPTDataset``); a blend component is a channel,
  told apart by the ``dataset_id`` the blended dataset puts on each item.
* SFT JSONL (``--sft-data``): chat ``messages`` (rendered with the chat template, only assistant tokens supervised;
  ShareGPT and Alpaca records too, through ``launch.sft_data``), plain ``text`` (every token supervised), or
  pre-tokenized ``input_ids`` with an optional ``loss_mask``; each record may name its ``channel``. One sample per
  row, right-padded; ``--packing`` puts several in one row, each keeping its own channel and segment id, and the
  attention mask built from the segment ids never crosses a sample boundary.
* Indexed datasets read for ``--eval-only``: every document cut into consecutive windows, so every token is scored
  exactly once.

Batches are read on tensor-parallel rank 0 and broadcast to the other TP ranks in one collective
(``TPBroadcast``), as Megatron-LM's ``get_batch_on_this_tp_rank`` does; channel ids travel in the same tensor.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from launch.jsonl_records import jsonl_objects
from patches.channel_loss import DEFAULT_CHANNEL, IGNORE_INDEX, ChannelIndex

FIELDS = ("tokens", "labels", "loss_mask", "channel_ids", "segment_ids")


@dataclass
class Sample:
    """One training sample, already shifted: ``labels[t]`` follows ``tokens[t]``; ``loss_mask[t]`` says whether that
    prediction is scored."""

    tokens: list[int]
    labels: list[int]
    loss_mask: list[int]
    channel: str
    where: str


# ---------------------------------------------------------------------------------------------- indexed datasets

def parse_blend(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``[W1, P1, W2, P2, ...]`` or ``[P1, P2, ...]`` -> (prefixes, weights or None), as Megatron-LM reads it."""
    items = list(data_path)
    if not items:
        raise ValueError("--data-path is empty; give PREFIX or W1 PREFIX1 W2 PREFIX2 ...")

    def is_number(x: str) -> bool:
        try:
            float(x)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[0::2]):
        weights = [float(w) for w in items[0::2]]
        if any(w <= 0 for w in weights):
            raise ValueError(f"--data-path weights {weights} must all be positive")
        return items[1::2], weights
    numbers = [x for x in items if is_number(x)]
    if numbers:
        raise ValueError(f"--data-path {items}: mixes weights and prefixes; give W1 PREFIX1 W2 PREFIX2 ... "
                         "(a weight before every prefix) or prefixes only")
    return items, None


def check_indexed_dataset(prefix: str) -> int:
    """Open ``prefix.idx``/``prefix.bin`` and check the .bin holds every token the index points at.

    Returns:
        the number of sequences. Raises ``ValueError`` naming the file and the fix for missing, foreign or truncated
        files, before any training step.
    """
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist; --data-path takes the prefix of a .bin/.idx pair written by "
                             "`python -m launch preprocess` (or Megatron-LM's tools/preprocess_data.py)")
    with open(idx, "rb") as f:
        header = f.read(len(_INDEX_HEADER))
        # version (8 bytes), dtype code (1), sequence count (8), document count (8), then int32 lengths and int64
        # pointers per sequence and int64 document indices: checked before megatron-core maps the files, whose
        # errors on an empty or short file do not say what is wrong.
        rest = f.read(25)
    if header != _INDEX_HEADER:
        raise ValueError(f"{idx} is not a Megatron index file (header {header!r}); rebuild it with "
                         "`python -m launch preprocess`")
    if len(rest) < 25:
        raise ValueError(f"{idx} is truncated or damaged (it ends inside its header); rebuild it")
    sequences, documents = struct.unpack("<QQ", rest[9:25])
    if sequences == 0:
        raise ValueError(f"{prefix}: the dataset holds no document; an empty data set trains nothing")
    if os.path.getsize(idx) < len(_INDEX_HEADER) + 25 + 12 * sequences + 8 * documents:
        raise ValueError(f"{idx} is truncated or damaged (shorter than its {sequences} sequences need); rebuild it")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:  # noqa: BLE001 - a short read of a damaged index raises anything from numpy
        raise ValueError(f"{idx} is truncated or damaged ({type(e).__name__}: {e}); rebuild it") from None
    lengths, pointers = ds.index.sequence_lengths, ds.index.sequence_pointers
    if len(lengths) == 0:
        raise ValueError(f"{prefix}: the dataset holds no document; an empty data set trains nothing")
    need = int(pointers[-1]) + int(lengths[-1]) * ds.index.dtype_size
    have = os.path.getsize(bin_)
    if have < need:
        raise ValueError(f"{bin_} is truncated: the index points at {need} bytes, the file has {have}; "
                         "rebuild the .bin/.idx pair")
    return len(lengths)


class _NullTokenizer:
    """What ``GPTDataset`` asks of a tokenizer when sequences are not reset at end-of-document: an ``eod`` id and a
    vocab size. No ``pad`` attribute, so padding uses megatron-core's own out-of-vocab id."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        # Part of the dataset's cache key, which megatron-core serializes.
        self.unique_identifiers = {"class": "NullTokenizer", "vocab_size": vocab_size, "eod": eod}


def build_blend_datasets(prefixes: list[str], weights: Optional[list[float]], split: str, seq_length: int,
                         sizes: list[int], seed: int, vocab_size: int, cache_path: Optional[str], built_on_rank):
    """(train, valid) ``GPTDataset``/``BlendedDataset`` through ``BlendedMegatronDatasetBuilder`` (every rank must
    call this: the builder synchronizes ranks with barriers)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_path, tokenizer=_NullTokenizer(vocab_size, eod=0), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, built_on_rank, config).build()
    return train, valid


class BlendRows(torch.utils.data.Dataset):
    """A megatron-core GPT dataset (or blend) as rows of the batch fields; the blend component is the channel."""

    def __init__(self, dataset, component_channel_ids: list[int]):
        self.dataset = dataset
        self.component_channel_ids = component_channel_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.dataset[i]
        tokens = item["tokens"]
        channel = self.component_channel_ids[int(item.get("dataset_id", 0))]
        return {"tokens": tokens, "labels": item["labels"], "loss_mask": item["loss_mask"].long(),
                "channel_ids": torch.full_like(tokens, channel), "segment_ids": torch.zeros_like(tokens)}


def indexed_windows(prefixes: list[str], channels: list[str], seq_length: int) -> list[Sample]:
    """Every document of every prefix cut into consecutive windows of ``seq_length + 1`` tokens (the last one
    shorter), each a sample of its prefix's channel: every token after a window's first is scored exactly once."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    samples = []
    for prefix, channel in zip(prefixes, channels):
        ds = IndexedDataset(prefix, mmap=True)
        for d in range(len(ds)):
            doc = [int(t) for t in ds[d]]
            for start in range(0, max(len(doc) - 1, 1), seq_length):
                piece = doc[start:start + seq_length + 1]
                if len(piece) < 2:
                    continue
                samples.append(Sample(piece[:-1], piece[1:], [1] * (len(piece) - 1), channel,
                                      f"{prefix}: document {d}, tokens {start}..{start + len(piece) - 1}"))
    if not samples:
        raise ValueError(f"{prefixes}: no document has two tokens; nothing to evaluate")
    return samples


# ---------------------------------------------------------------------------------------------- SFT JSONL

def _shift(ids: list[int], supervised: list[bool], channel: str, where: str) -> Sample:
    """Megatron's shift: predict ``ids[t+1]`` from ``ids[:t+1]``; scored when the target token is supervised."""
    return Sample(ids[:-1], ids[1:], [int(s) for s in supervised[1:]], channel, where)


def _ids(value, where: str, name: str, vocab_size: Optional[int]) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"{where}: {name!r} must be a list of integers")
    if vocab_size is not None and any(x < 0 or x >= vocab_size for x in value):
        bad = next(x for x in value if x < 0 or x >= vocab_size)
        raise ValueError(f"{where}: {name!r} holds token id {bad}, outside the model's vocab [0, {vocab_size})")
    return value


def read_sft_jsonl(path: str, seq_length: int, get_tokenizer=None, vocab_size: Optional[int] = None,
                   channel_field: str = "channel") -> list[Sample]:
    """Read ``path`` into shifted samples of at most ``seq_length`` predictions (longer ones are truncated).

    ``get_tokenizer`` is called (once) only when a record needs one (``text`` or chat records); pre-tokenized data
    needs none.

    Raises:
        ValueError: a malformed line, naming ``path:line``, or records that need a tokenizer when none is given.
    """
    from launch.sft_data import Conversation, _channel_of, record_to_messages, tokenize_conversation

    if not os.path.isfile(path):
        raise ValueError(f"--sft-data {path!r} does not exist; pass a JSONL file with one sample per line")
    samples = []
    loaded = []

    def tokenizer(where: str):
        if not loaded:
            try:
                loaded.append(get_tokenizer() if get_tokenizer is not None else None)
            except ValueError as e:
                raise ValueError(f"{where}: this record needs a tokenizer, and {e}") from None
        if loaded[0] is None:
            raise ValueError(f"{where}: this record needs a tokenizer; pass --tokenizer-model DIR (a Hugging Face "
                             "tokenizer folder) or load a checkpoint that carries one")
        return loaded[0]

    for _, where, record in jsonl_objects(path):
        channel = _channel_of(record, channel_field, where) or DEFAULT_CHANNEL
        if "input_ids" in record:
            ids = _ids(record["input_ids"], where, "input_ids", vocab_size)
            mask = record.get("loss_mask", [1] * len(ids))
            if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
                raise ValueError(f"{where}: 'loss_mask' must be a list of 0/1 as long as 'input_ids' "
                                 f"({len(ids)})")
            supervised = [bool(m) for m in mask]
        elif "text" in record:
            if not isinstance(record["text"], str) or not record["text"]:
                raise ValueError(f"{where}: 'text' must be a non-empty string")
            ids = list(tokenizer(where)(record["text"])["input_ids"])
            supervised = [True] * len(ids)
        else:
            messages = record_to_messages(record, where)
            tok = tokenize_conversation(tokenizer(where), Conversation(messages, channel, where), seq_length + 1)
            ids, supervised = tok.input_ids, [label != IGNORE_INDEX for label in tok.labels]
        if len(ids) < 2:
            raise ValueError(f"{where}: the sample has {len(ids)} token(s); at least 2 are needed to predict one")
        if vocab_size is not None:
            _ids(ids, where, "tokens", vocab_size)
        ids, supervised = ids[:seq_length + 1], supervised[:seq_length + 1]
        samples.append(_shift(ids, supervised, channel, where))
    if not samples:
        raise ValueError(f"--sft-data {path!r} holds no samples; an empty data set trains nothing")
    return samples


def channel_names_of(samples: Sequence[Sample]) -> list[str]:
    return sorted({s.channel for s in samples})


def check_declared(samples: Sequence[Sample], index: ChannelIndex) -> None:
    """Every sample's channel must be in the declared set (``--channel-names``); name the first offender."""
    for s in samples:
        if s.channel not in index:
            raise ValueError(f"{s.where}: channel {s.channel!r} is not among --channel-names {list(index.names)}; "
                             "add it or fix the record")


# ---------------------------------------------------------------------------------------------- rows

def next_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices, in order, into rows of at most ``capacity`` tokens (``launch.sft_packing``'s rule)."""
    from launch.sft_packing import next_fit_pack

    return next_fit_pack(lengths, capacity)


class SampleRows(torch.utils.data.Dataset):
    """Samples as padded rows of ``seq_length``; with ``packing`` several samples share a row.

    Padding has ``loss_mask`` 0, channel -1 and segment id -1; a packed sub-sample ``k`` has segment id ``k``.
    """

    def __init__(self, samples: Sequence[Sample], index: ChannelIndex, seq_length: int, packing: bool):
        self.samples = list(samples)
        self.seq_length = seq_length
        self.channel_of = [index.id(s.channel) for s in self.samples]
        lengths = [len(s.tokens) for s in self.samples]
        self.rows = next_fit_rows(lengths, seq_length) if packing else [[i] for i in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        row = {"tokens": torch.zeros(s, dtype=torch.long), "labels": torch.zeros(s, dtype=torch.long),
               "loss_mask": torch.zeros(s, dtype=torch.long), "channel_ids": torch.full((s,), -1, dtype=torch.long),
               "segment_ids": torch.full((s,), -1, dtype=torch.long)}
        at = 0
        for k, j in enumerate(self.rows[i]):
            sample = self.samples[j]
            n = len(sample.tokens)
            row["tokens"][at:at + n] = torch.tensor(sample.tokens)
            row["labels"][at:at + n] = torch.tensor(sample.labels)
            row["loss_mask"][at:at + n] = torch.tensor(sample.loss_mask)
            row["channel_ids"][at:at + n] = self.channel_of[j]
            row["segment_ids"][at:at + n] = k
            at += n
        return row


def empty_row(seq_length: int) -> dict[str, torch.Tensor]:
    """A row that scores nothing: pads the last partial batch of an exactly-once evaluation."""
    zeros = torch.zeros(seq_length, dtype=torch.long)
    return {"tokens": zeros, "labels": zeros, "loss_mask": zeros,
            "channel_ids": torch.full((seq_length,), -1, dtype=torch.long),
            "segment_ids": torch.full((seq_length,), -1, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------- batches

def pretraining_indices(num_rows: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                        once_in: Optional[int] = None) -> Iterator[list[Optional[int]]]:
    """Megatron-LM's ``MegatronPretrainingSampler``: global rows in order from ``consumed``; each global
    micro-batch step takes ``micro_batch_size * dp_size`` rows and this DP rank gets its contiguous slice.

    By default the rows repeat when they run out (SFT data smaller than the run). With ``once_in`` (a global batch
    size) every row comes exactly once, and the last global batch is completed with ``None`` (rows that score
    nothing) so that every rank runs the same number of steps.
    """
    step = micro_batch_size * dp_size
    total = math.ceil(num_rows / once_in) * once_in if once_in else None
    start = consumed
    while total is None or start < total:
        rows = [(start + k) % num_rows if total is None else (start + k if start + k < num_rows else None)
                for k in range(step)]
        yield rows[dp_rank * micro_batch_size:(dp_rank + 1) * micro_batch_size]
        start += step


def batches(dataset, indices: Iterator[list[Optional[int]]], seq_length: int) -> Iterator[dict[str, torch.Tensor]]:
    for rows in indices:
        items = [dataset[i] if i is not None else empty_row(seq_length) for i in rows]
        yield {k: torch.stack([item[k] for item in items]) for k in FIELDS}


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True where attention is masked: the future, and any other packed sample."""
    s = segment_ids.shape[1]
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=segment_ids.device), diagonal=1)
    other = segment_ids[:, :, None] != segment_ids[:, None, :]
    return (future[None] | other).unsqueeze(1)


def position_ids_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in every packed sample (rope in megatron-core is relative, so within a sample the
    attention equals the sample's own; learned absolute embeddings would read these)."""
    b, s = segment_ids.shape
    pos = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_pos = torch.where(starts, pos, torch.zeros_like(pos))
    return pos - torch.cummax(start_pos, dim=1).values


class TPBroadcast:
    """An iterator of batches that reads on TP rank 0 and broadcasts to the TP group in one collective.

    Args:
        source: the batch iterator, or None on ranks that do not read (TP rank > 0).
        micro_batch_size, seq_length: the fixed shape every rank allocates.
        packing: build the block-diagonal attention mask from the segment ids (else the model's causal mask).
    """

    def __init__(self, source: Optional[Iterator[dict]], micro_batch_size: int, seq_length: int, packing: bool):
        self.source = source
        self.shape = (len(FIELDS), micro_batch_size, seq_length)
        self.packing = packing

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_rank() == 0:
            batch = next(self.source)
            packed = torch.stack([batch[k].long() for k in FIELDS])
        else:
            packed = torch.empty(self.shape, dtype=torch.long)
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast(packed, ps.get_tensor_model_parallel_src_rank(), group=group)
        out = dict(zip(FIELDS, packed.unbind(0)))
        out["position_ids"] = position_ids_from_segments(out["segment_ids"]) if self.packing else \
            torch.arange(self.shape[2]).expand(self.shape[1], self.shape[2])
        out["attention_mask"] = attention_mask_from_segments(out["segment_ids"]) if self.packing else None
        return out


def steps_for_once(num_rows: int, global_batch_size: int) -> int:
    """Iterations that visit every row exactly once (the last one padded)."""
    return max(1, math.ceil(num_rows / global_batch_size))


