"""Megatron `torch_dist` checkpoints (megatron.core.dist_checkpointing over PyTorch DCP), read and written safely.

    <root>/latest_checkpointed_iteration.txt
    <root>/release/ or <root>/iter_0000100/
        metadata.json              {"sharded_backend": "torch_dist", ...}
        common.pt                  args, checkpoint_version, iteration (a torch pickle: loaded weights-only)
        .metadata                  DCP index of every tensor shard (a plain pickle)
        __R_I.distcp               tensor data written by rank R, and byte objects (torch.save payloads)

Every pickle here (common.pt, .metadata, each byte object) passes checkpoint_tools.pickle_trust before anything
unpickles it: `validate` vets them all, and `dist_load` vets, then lets megatron-core load with our copy of
common.pt (megatron-core and PyTorch DCP would otherwise unpickle .metadata and byte objects without limits).

Tensors are stored by global, layout-free keys (layers stacked on a leading axis), so a checkpoint saved at one
TP/PP is loaded at another: megatron-core reshards at load. Saving and loading therefore run inside real
megatron-core models under torchrun (see mcore_worker); this module holds the format facts and the safety checks.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from checkpoint_tools.pickle_trust import (PolicyLike, load_pickle_file, load_torch_file, scan_torch_bytes,
                                           trust_policy)
from checkpoint_tools.errors import CheckpointError
from megatron_bridge.legacy_format import TRACKER, iteration_dir_name, read_tracker

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}  # as Megatron-LM writes


def iteration_dir(root: str) -> str:
    return os.path.join(root, iteration_dir_name(read_tracker(root)))


def is_torch_dist_checkpoint(root: str) -> bool:
    if not os.path.isfile(os.path.join(root, TRACKER)):
        return False
    try:
        return os.path.isfile(os.path.join(iteration_dir(root), "metadata.json"))
    except CheckpointError:
        return False


def read_dcp_metadata(root: str, policy: PolicyLike = None):
    """The DCP index (torch.distributed.checkpoint.metadata.Metadata), scanned and unpickled under the policy."""
    path = os.path.join(iteration_dir(root), ".metadata")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint")
    return load_pickle_file(path, policy)


def read_common(root: str, policy: PolicyLike = None) -> dict:
    path = os.path.join(iteration_dir(root), "common.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint")
    return load_torch_file(path, policy, mmap=False)


def vet_byte_objects(root: str, md, policy: PolicyLike = None) -> int:
    """Scan every byte object of the index (torch.save payloads inside the .distcp files: `_extra_state`, RNG and
    optimizer objects) under the policy. PyTorch DCP loads them with `torch.load(weights_only=False)`, so this
    scan is all that stands between a crafted .distcp file and code execution. Returns how many were scanned."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    it_dir = iteration_dir(root)
    count = 0
    for index, info in (md.storage_data or {}).items():
        if not isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{os.path.join(it_dir, info.relative_path)} (byte object {index.fqn!r})"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: stored through transforms {info.transform_descriptors}; such an "
                                  f"object cannot be vetted before PyTorch unpickles it, so it is refused")
        with open(os.path.join(it_dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            scan_torch_bytes(f.read(info.length), where, policy)
        count += 1
    return count


def validate(root: str, policy: PolicyLike = None) -> dict:
    """Check that every file the index names exists and is long enough and that every pickle in the checkpoint
    (common.pt, .metadata, byte objects) passes the trust policy; return the common state dict."""
    it_dir = iteration_dir(root)
    with open(os.path.join(it_dir, "metadata.json")) as f:
        meta = json.load(f)
    if meta.get("sharded_backend") != "torch_dist":
        raise CheckpointError(f"{it_dir}: sharded_backend={meta.get('sharded_backend')!r}; only torch_dist is supported")
    if any(n.startswith("mp_rank_") for n in os.listdir(it_dir)):
        raise CheckpointError(f"{it_dir}: holds both torch_dist files and legacy mp_rank_* folders; separate them")
    common = read_common(root, policy)
    md = read_dcp_metadata(root, policy)
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, end in sorted(need.items()):
        p = os.path.join(it_dir, rel)
        if not os.path.exists(p):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(p) < end:
            problems.append(f"{rel} is truncated ({os.path.getsize(p)} < {end} bytes)")
    if problems:
        raise CheckpointError(f"{it_dir}: " + "; ".join(problems))
    vet_byte_objects(root, md, policy)
    return common


def tensor_index(root: str, policy: PolicyLike = None) -> dict[str, tuple[tuple[int, ...], Optional[str]]]:
    """Global key -> (global shape, dtype name) for every tensor in the checkpoint (no tensor data read)."""
    md = read_dcp_metadata(root, policy)
    out = {}
    for key, m in md.state_dict_metadata.items():
        size = getattr(m, "size", None)
        if size is None:
            continue  # bytes objects (e.g. _extra_state, optimizer step counters)
        out[key] = (tuple(size), str(m.properties.dtype).replace("torch.", ""))
    return out


def dist_load(sharded_state_dict: dict, root: str, policy: PolicyLike = None) -> dict:
    """megatron.core.dist_checkpointing.load of a vetted checkpoint: every pickle passes the policy first (in this
    process, right before megatron-core reads the files), and common.pt is handed over already loaded, so
    megatron-core never unpickles it itself."""
    import copy

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    common = validate(root, trust_policy(policy))

    class VettedCommon(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return copy.deepcopy(common)  # megatron-core merges loaded state into it

    return dist_checkpointing.load(sharded_state_dict, iteration_dir(root), common_strategy=VettedCommon())
