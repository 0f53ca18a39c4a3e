"""Megatron torch files (rank files, common.pt, optimizer state) load through the one trust policy.

Kept as the name Megatron-side readers import; the policy itself (allow-list, opcode scanner, loaders) lives in
checkpoint_tools.pickle_trust so the Hugging Face `.bin` reader shares it.
"""
from __future__ import annotations

from typing import Any, Iterable

from checkpoint_tools.pickle_trust import PolicyLike, load_torch_file, trust_policy


def safe_torch_load(path: str, *, mmap: bool = True, policy: PolicyLike = None,
                    extra_globals: Iterable[str] = ()) -> Any:
    """Scan, then torch.load weights-only under `policy` plus `extra_globals` ('MODULE.NAME' a user trusts)."""
    return load_torch_file(path, trust_policy(policy).with_extra(extra_globals), mmap=mmap)
