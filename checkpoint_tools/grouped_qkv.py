"""q/k/v packed per KV group: Megatron's `linear_qkv` and InternLM2's `wqkv` share this one layout.

    fused[ng * (per + 2) * hd, ...] viewed as [ng, per + 2, hd, ...], per = num_heads / ng:
        [g, :per]    q heads g*per .. (g+1)*per - 1
        [g, per]     k head g
        [g, per + 1] v head g

Both directions are pure reshapes and one concatenation, so merge(split(x)) is bit-exact.
"""
from __future__ import annotations

from checkpoint_tools.lazy_torch import torch  # family tables import this without moving tensors


def pack_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int,
                     head_dim: int) -> torch.Tensor:
    """[nq*hd, ...], [ng*hd, ...], [ng*hd, ...] -> [ng * (nq/ng + 2) * hd, ...] (weights or biases)."""
    rest = tuple(q.shape[1:])
    per = q.shape[0] // (num_groups * head_dim)
    return torch.cat([q.reshape((num_groups, per * head_dim) + rest), k.reshape((num_groups, head_dim) + rest),
                      v.reshape((num_groups, head_dim) + rest)], dim=1).reshape((-1,) + rest)


def unpack_grouped_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int,
                       what: str = "fused qkv") -> list[torch.Tensor]:
    """The inverse of `pack_grouped_qkv`: [q, k, v]; a row count that does not fit the shape is an error."""
    per = num_heads // num_groups
    rest = tuple(fused.shape[1:])
    expected = num_groups * (per + 2) * head_dim
    if fused.shape[0] != expected:
        raise ValueError(f"{what} has {fused.shape[0]} rows, expected {expected} "
                         f"(heads={num_heads}, groups={num_groups}, head_dim={head_dim})")
    q, k, v = torch.split(fused.reshape((num_groups, (per + 2) * head_dim) + rest),
                          [per * head_dim, head_dim, head_dim], dim=1)
    return [q.reshape((num_groups * per * head_dim,) + rest), k.reshape((num_groups * head_dim,) + rest),
            v.reshape((num_groups * head_dim,) + rest)]
