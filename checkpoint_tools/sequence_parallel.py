"""Ulysses sequence parallelism for the workbench model: long inputs split over the ranks of a process group.

Outside attention every rank holds a contiguous slice of the sequence (embeddings, MLPs, norms, the head are
per-token). Around attention, an all-to-all trades the split: scatter the heads, gather the sequence, so each rank
runs exact causal attention over the whole sequence for H/P of the heads; a second all-to-all trades back. The
all-to-alls are autograd functions (the backward is the reverse exchange), so it trains as it infers.

    enable_sequence_parallel(model, group)   registers the attention function (transformers' AttentionInterface,
                                             no monkey-patching) and points the model at it
    sequence_parallel_forward(model, input_ids, group)   this rank's slice of the sequence through the model,
                                             with global position ids; returns the usual output (local logits)
    shard_sequence / gather_sequence         this rank's slice of a [batch, seq, ...] tensor, and all slices back

Forward passes only (training, scoring, prefill): no KV cache, no padding mask (pack or trim instead), and the
head count must divide by the group size. Imported optionally: the modeling file does not need it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

ULYSSES = "workbench_ulysses"


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split `x` into P pieces along `scatter_dim`, send piece j to rank j, concatenate what arrives along
    `gather_dim` (in rank order)."""
    world, _ = _world(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # [P, ...piece]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _SeqAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def ulysses_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the full sequence for this rank's heads. In: [batch, heads, local seq, dim]; out:
    [batch, local seq, heads, dim] (as transformers' attention functions return)."""
    group = getattr(module, "sequence_parallel_group", None)
    if attention_mask is not None:
        raise ValueError("sequence parallelism runs unpadded causal attention only; pack or trim the batch")
    world, _ = _world(group)
    n_heads = query.shape[1]
    if key.shape[1] % world:  # too few KV heads to split: give every rank the query heads' share of them
        key = _repeat_heads(key, n_heads // key.shape[1])
        value = _repeat_heads(value, n_heads // value.shape[1])
    q = _SeqAllToAll.apply(query, 1, 2, group)  # scatter heads, gather sequence
    k = _SeqAllToAll.apply(key, 1, 2, group)
    v = _SeqAllToAll.apply(value, 1, 2, group)
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, _repeat_heads(k, rep), _repeat_heads(v, rep), is_causal=True,
                                         scale=scaling, dropout_p=dropout if module.training else 0.0)
    out = _SeqAllToAll.apply(out, 2, 1, group)  # scatter sequence, gather heads
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ULYSSES, ulysses_attention)


def enable_sequence_parallel(model, group=None):
    """Point `model` (a workbench model) at Ulysses attention over `group` (default: the world)."""
    if not dist.is_initialized():
        raise ValueError("sequence parallelism needs torch.distributed initialised (e.g. torchrun + "
                         "init_process_group('gloo' or 'nccl'))")
    world, _ = _world(group)
    heads = model.config.num_attention_heads
    if heads % world:
        raise ValueError(f"num_attention_heads={heads} does not divide over {world} sequence-parallel ranks; use a "
                         f"group size that divides {heads}")
    model._attn_before_sequence_parallel = model.config._attn_implementation
    model.config._attn_implementation = ULYSSES
    model.config.use_cache = False
    for m in model.modules():  # attention modules by shape, so a remote-code copy of the model class works too
        if hasattr(m, "num_key_value_groups") and hasattr(m, "o_proj"):
            m.sequence_parallel_group = group
    return model


def disable_sequence_parallel(model):
    model.config._attn_implementation = getattr(model, "_attn_before_sequence_parallel", "sdpa")
    model.config.use_cache = True
    return model


def shard_sequence(t: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of `t` along `dim` (the sequence length must divide by the group size)."""
    world, rank = _world(group)
    if t.shape[dim] % world:
        raise ValueError(f"sequence length {t.shape[dim]} does not divide over {world} sequence-parallel ranks; pad "
                         f"or trim it to a multiple of {world}")
    return t.chunk(world, dim=dim)[rank]


def gather_sequence(t: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Every rank's slice of `t`, concatenated along `dim` (for reading results; not differentiable)."""
    world, _ = _world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def sequence_parallel_forward(model, input_ids: torch.Tensor, group=None,
                              attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Run this rank's slice of the full `input_ids` [batch, seq] with its global position ids."""
    if model.config._attn_implementation != ULYSSES:
        raise ValueError("call enable_sequence_parallel(model, group) first")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("sequence parallelism runs unpadded causal attention only; pack or trim the batch")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    return model(input_ids=shard_sequence(input_ids, group), position_ids=shard_sequence(positions, group),
                 use_cache=False, **kwargs)


__all__ = ["ULYSSES", "enable_sequence_parallel", "disable_sequence_parallel", "sequence_parallel_forward",
           "shard_sequence", "gather_sequence", "ulysses_attention"]
