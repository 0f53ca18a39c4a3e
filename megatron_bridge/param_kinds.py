"""How each Megatron parameter kind is split over tensor-parallel ranks, as pure functions on tensors.

Every kind turns the canonical tensor(s) it is made of into one tensor per TP rank (`split`) and back (`merge`), so
`merge(split(x)) == x` is a plain test with no process groups. The rule lives in the kind, not in the name:

    Replicated     norms, q/k layernorm, row-parallel biases      every rank holds the whole tensor
    Column         (dim 0)                                        rank r holds rows [r*n/tp, (r+1)*n/tp)
    Row            (dim 1)                                        rank r holds columns [r*n/tp, (r+1)*n/tp)
    VocabParallel  word embeddings, output layer                  pad rows to the padded vocab, then Column
    QKV            q, k, v -> linear_qkv, grouped per KV head:    [q_g0 (nq/ng heads), k_g0, v_g0, q_g1, ...]
                                                                  then Column (ng < tp: an even chunk too; mcore
                                                                  all-gathers and picks its group at run time)
    GatedMLP       gate, up -> linear_fc1                         rank r holds [gate_r; up_r], not a chunk of
                                                                  [gate; up]
"""
from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Sequence

import torch

from checkpoint_tools.grouped_qkv import pack_grouped_qkv, unpack_grouped_qkv


@dataclass(frozen=True)
class Shape:
    """What the kinds need to know about the model."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int = 0
    padded_vocab_size: int = 0


def _chunks(t: torch.Tensor, tp: int, dim: int, what: str) -> list[torch.Tensor]:
    if t.shape[dim] % tp:
        raise ValueError(f"{what}: size {t.shape[dim]} along dim {dim} is not divisible by TP={tp}")
    return list(torch.chunk(t, tp, dim=dim))


class Kind(abc.ABC):
    """A split rule: `n_inputs` canonical tensors <-> one tensor per TP rank."""

    n_inputs = 1
    name = "kind"

    @abc.abstractmethod
    def split(self, tensors: Sequence[torch.Tensor], tp: int, shape: Shape) -> list[torch.Tensor]:
        """One tensor per TP rank from the canonical tensor(s)."""

    @abc.abstractmethod
    def merge(self, shards: Sequence[torch.Tensor], shape: Shape) -> list[torch.Tensor]:
        """The canonical tensor(s) from one tensor per TP rank."""

    def shard(self, tensors: Sequence[torch.Tensor], tp: int, rank: int, shape: Shape) -> torch.Tensor:
        """Rank `rank`'s piece alone (equal to `split(...)[rank]`); kinds override it to skip building the rest."""
        return self.split(tensors, tp, shape)[rank]

    def shard_parts(self, tensors: Sequence[torch.Tensor], tp: int, rank: int, shape: Shape) -> list[torch.Tensor]:
        """`shard` without building it: row blocks (views of the inputs where the kind allows) whose concatenation
        along dim 0 is rank `rank`'s piece, for a writer that streams them as they are (the mirror of
        `merge_parts`); kinds that interleave within rows (Row) build the piece, one block."""
        return [self.shard(tensors, tp, rank, shape)]

    def merge_parts(self, shards: Sequence[torch.Tensor], shape: Shape) -> list[list[torch.Tensor]]:
        """`merge` without building anything: per canonical tensor, contiguous row blocks of the shards whose
        concatenation along dim 0 is that tensor. A writer streams the blocks as they are (no copy of the merged
        tensor); kinds whose merge interleaves within rows (Row) build the tensor, one block."""
        return [[t] for t in self.merge(shards, shape)]


class Replicated(Kind):
    name = "replicated"

    def split(self, tensors, tp, shape):
        return [tensors[0]] * tp

    def merge(self, shards, shape):
        first = shards[0]
        for r, s in enumerate(shards[1:], start=1):
            if s.shape != first.shape or not torch.equal(s, first):
                raise ValueError(f"replicated parameter differs between TP rank 0 and rank {r}; the checkpoint's "
                                 f"ranks have diverged")
        return [first]


class Column(Kind):
    name = "column"

    def split(self, tensors, tp, shape):
        return _chunks(tensors[0], tp, 0, "column-parallel")

    def merge(self, shards, shape):
        return [torch.cat(list(shards), dim=0)]

    def merge_parts(self, shards, shape):
        return [list(shards)]


class Row(Kind):
    name = "row"

    def split(self, tensors, tp, shape):
        return _chunks(tensors[0], tp, 1, "row-parallel")

    def merge(self, shards, shape):
        return [torch.cat(list(shards), dim=1)]


class VocabParallel(Kind):
    """Rows padded to Megatron's padded vocab with zeros (never a target, so training pushes them down)."""

    name = "vocab"

    @staticmethod
    def _check(t: torch.Tensor, tp: int, shape: Shape) -> None:
        if t.shape[0] != shape.vocab_size:
            raise ValueError(f"vocab tensor has {t.shape[0]} rows, config says vocab_size={shape.vocab_size}")
        if shape.padded_vocab_size < shape.vocab_size or shape.padded_vocab_size % tp:
            raise ValueError(f"padded_vocab_size={shape.padded_vocab_size} must be >= vocab_size="
                             f"{shape.vocab_size} and divisible by TP={tp}")

    def split(self, tensors, tp, shape):
        t = tensors[0]
        self._check(t, tp, shape)
        pad = shape.padded_vocab_size - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))], dim=0)
        return _chunks(t, tp, 0, "vocab-parallel")

    def shard(self, tensors, tp, rank, shape):
        t = tensors[0]
        self._check(t, tp, shape)
        per = shape.padded_vocab_size // tp
        start, end = rank * per, (rank + 1) * per
        real = t[min(start, shape.vocab_size):min(end, shape.vocab_size)]
        pad = per - real.shape[0]
        return torch.cat([real, real.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else real

    def merge(self, shards, shape):
        full = torch.cat(list(shards), dim=0)
        if full.shape[0] < shape.vocab_size:
            raise ValueError(f"vocab tensor has {full.shape[0]} rows < vocab_size={shape.vocab_size}")
        return [full[: shape.vocab_size]]

    def merge_parts(self, shards, shape):
        rows = sum(s.shape[0] for s in shards)
        if rows < shape.vocab_size:
            raise ValueError(f"vocab tensor has {rows} rows < vocab_size={shape.vocab_size}")
        parts, left = [], shape.vocab_size
        for s in shards:  # the padding rows at the end are left out
            if left:
                parts.append(s[:min(left, s.shape[0])])
                left -= parts[-1].shape[0]
        return [parts]


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """[nq*hd, ...], [ng*hd, ...], [ng*hd, ...] -> [ng * (nq/ng + 2) * hd, ...] grouped per KV head."""
    return pack_grouped_qkv(q, k, v, shape.num_groups, shape.head_dim)


def unpack_qkv(fused: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    return unpack_grouped_qkv(fused, shape.num_heads, shape.num_groups, shape.head_dim, "linear_qkv")


class QKV(Kind):
    n_inputs = 3
    name = "qkv"

    def split(self, tensors, tp, shape):
        return _chunks(pack_qkv(*tensors, shape), tp, 0, "linear_qkv")

    def shard(self, tensors, tp, rank, shape):
        pieces = self.shard_parts(tensors, tp, rank, shape)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def shard_parts(self, tensors, tp, rank, shape):
        q, k, v = tensors
        ng, hd = shape.num_groups, shape.head_dim
        per = shape.num_heads // ng
        block = (per + 2) * hd
        total = ng * block
        if total % tp:
            raise ValueError(f"linear_qkv: size {total} along dim 0 is not divisible by TP={tp}")
        lo, hi = rank * total // tp, (rank + 1) * total // tp
        pieces = []
        for g in range(lo // block, (hi - 1) // block + 1):
            # group g occupies [g*block, (g+1)*block) = q rows, then k rows, then v rows
            parts = [(q, g * per * hd, per * hd), (k, g * hd, hd), (v, g * hd, hd)]
            pos = g * block
            for src, first, n in parts:
                a, b = max(lo, pos), min(hi, pos + n)
                if a < b:
                    pieces.append(src[first + a - pos:first + b - pos])
                pos += n
        return pieces

    def merge(self, shards, shape):
        return unpack_qkv(torch.cat(list(shards), dim=0), shape)

    def merge_parts(self, shards, shape):
        # The fused rows, shard after shard, are groups of [q (nq/ng heads), k, v]: cut every shard at those
        # boundaries and deal the blocks to q, k and v in order.
        ng, hd = shape.num_groups, shape.head_dim
        q_rows = shape.num_heads // ng * hd
        block = q_rows + 2 * hd
        ends = (q_rows, q_rows + hd, block)  # within a group: where q, k and v end
        rows = sum(s.shape[0] for s in shards)
        if rows != ng * block:
            raise ValueError(f"linear_qkv has {rows} rows, expected {ng * block} (heads={shape.num_heads}, "
                             f"groups={ng}, head_dim={hd})")
        parts: list[list[torch.Tensor]] = [[], [], []]
        pos = 0
        for s in shards:
            local = 0
            while local < s.shape[0]:
                within = pos % block
                role = next(i for i, end in enumerate(ends) if within < end)
                take = min(ends[role] - within, s.shape[0] - local)
                parts[role].append(s[local:local + take])
                local += take
                pos += take
        return parts


class GatedMLP(Kind):
    n_inputs = 2
    name = "gated_mlp"

    def split(self, tensors, tp, shape):
        gate, up = tensors
        return [torch.cat([g, u], dim=0) for g, u in
                zip(_chunks(gate, tp, 0, "gate_proj"), _chunks(up, tp, 0, "up_proj"))]

    def shard(self, tensors, tp, rank, shape):
        return torch.cat(self.shard_parts(tensors, tp, rank, shape), dim=0)

    def shard_parts(self, tensors, tp, rank, shape):
        gate, up = tensors
        return [_chunks(gate, tp, 0, "gate_proj")[rank], _chunks(up, tp, 0, "up_proj")[rank]]

    def merge(self, shards, shape):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]

    def merge_parts(self, shards, shape):
        for s in shards:
            if s.shape[0] % 2:
                raise ValueError(f"linear_fc1 shard has {s.shape[0]} rows: not [gate; up] halves")
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [[h[0] for h in halves], [h[1] for h in halves]]


REPLICATED, COLUMN, ROW, VOCAB, QKV_KIND, GATED_MLP = Replicated(), Column(), Row(), VocabParallel(), QKV(), GatedMLP()


def check_tp(tp: int, shape: Shape, ffn_hidden_size: int) -> None:
    """Raise naming the valid choices when TP does not fit the heads, KV groups or FFN size."""
    nq, ng = shape.num_heads, shape.num_groups
    problems = []
    if nq % tp:
        problems.append(f"num_attention_heads={nq} is not divisible by TP={tp}")
    if ng >= tp and ng % tp:
        problems.append(f"num_query_groups={ng} is not divisible by TP={tp}")
    if ng < tp and tp % ng:
        problems.append(f"TP={tp} is not a multiple of num_query_groups={ng} (needed when groups < TP)")
    if ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={ffn_hidden_size} is not divisible by TP={tp}")
    if problems:
        valid = [t for t in range(1, nq + 1) if nq % t == 0 and ffn_hidden_size % t == 0
                 and ((ng >= t and ng % t == 0) or (ng < t and t % ng == 0))]
        raise ValueError("; ".join(problems) + f"; use TP in {valid}")
