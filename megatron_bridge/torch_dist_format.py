"""Megatron `torch_dist` checkpoints (megatron.core.dist_checkpointing over PyTorch DCP), read and written safely.

    <root>/latest_checkpointed_iteration.txt
    <root>/release/ or <root>/iter_0000100/
        metadata.json              {"sharded_backend": "torch_dist", ...}
        common.pt                  args, checkpoint_version, iteration (a torch pickle: loaded weights-only)
        .metadata                  DCP index of every tensor shard (a plain pickle)
        __R_I.distcp               tensor data written by rank R, and byte objects (torch.save payloads)

The common state (args, checkpoint_version, iteration, ...) has two layouts: megatron-core up to 0.16 writes
`common.pt`; 0.17 and later write no common.pt and keep it as a sharded object `common_state` instead, a byte
object inside a .distcp file (`torch.save([common])`) that the index locates. `read_common` reads either.

Every pickle here (common.pt, .metadata, each byte object, common_state included) passes
checkpoint_tools.pickle_trust before anything unpickles it: `validate` vets them all, and `dist_load` vets, then
lets megatron-core load with our copy of the common state (megatron-core and PyTorch DCP would otherwise unpickle
.metadata and byte objects without limits).

Tensors are stored by global, layout-free keys (layers stacked on a leading axis), so a checkpoint saved at one
TP/PP is loaded at another: megatron-core reshards at load. Conversion therefore reads and writes the global tensors
itself, in one process (torch_dist_reader, torch_dist_writer); verification loads them into real megatron-core models
under torchrun (mcore_worker, through `dist_load`). This module holds the format facts and the safety checks.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from checkpoint_tools.pickle_trust import (PolicyLike, load_pickle_file, load_torch_bytes, load_torch_file,
                                           scan_torch_bytes, trust_policy)
from checkpoint_tools.pickle_peek import StandIn, is_stand_in, peek_pickle_file, peek_torch_bytes, peek_torch_file
from checkpoint_tools.errors import CheckpointError
from megatron_bridge.legacy_format import TRACKER, iteration_dir_name, read_tracker

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}  # as Megatron-LM writes
COMMON_FILE = "common.pt"  # megatron-core <= 0.16
# megatron-core >= 0.17: ShardedObject("common_state", data, global_shape=(1,), global_offset=(0,)), whose DCP key
# is its unique_key "<key>/shard_<offset>_<shape>".
COMMON_STATE_KEY = "common_state/shard_0_1"


def iteration_dir(root: str) -> str:
    return os.path.join(root, iteration_dir_name(read_tracker(root)))


def is_torch_dist_checkpoint(root: str) -> bool:
    if not os.path.isfile(os.path.join(root, TRACKER)):
        return False
    try:
        return os.path.isfile(os.path.join(iteration_dir(root), "metadata.json"))
    except CheckpointError:
        return False


def read_dcp_metadata(root: str, policy: PolicyLike = None, *, light: bool = False):
    """The DCP index (torch.distributed.checkpoint.metadata.Metadata), scanned and unpickled under the policy;
    `light`: as checkpoint_tools.pickle_peek stand-ins, without importing torch (same vetting)."""
    path = os.path.join(iteration_dir(root), ".metadata")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint")
    return (peek_pickle_file if light else load_pickle_file)(path, policy)


def _is_byte_object(entry) -> bool:
    """Whether an index entry describes a byte object, for an index loaded by torch or as pickle_peek stand-ins."""
    if isinstance(entry, StandIn):
        return is_stand_in(entry, "torch.distributed.checkpoint.metadata", "BytesStorageMetadata")
    if entry is None:
        return False
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return isinstance(entry, BytesStorageMetadata)


def read_common(root: str, policy: PolicyLike = None) -> dict:
    """The common state dict (args, checkpoint_version, iteration, ...) from common.pt or, written by
    megatron-core 0.17 and later, from the `common_state` byte object; vetted by the policy, loaded weights-only."""
    it_dir = iteration_dir(root)
    if os.path.exists(os.path.join(it_dir, COMMON_FILE)):
        return load_torch_file(os.path.join(it_dir, COMMON_FILE), policy, mmap=False)
    return _common_from_shards(it_dir, read_dcp_metadata(root, policy), policy)


def _common_from_shards(it_dir: str, md, policy: PolicyLike = None, light: bool = False) -> dict:
    """The `common_state` byte object: read by its byte range in the .distcp file the index names, scanned, then
    loaded weights-only. PyTorch DCP is never asked to load it (it would unpickle it without limits)."""
    found = [(i, info) for i, info in (md.storage_data or {}).items() if i.fqn == COMMON_STATE_KEY]
    if not found:
        raise CheckpointError(f"{it_dir}: neither {COMMON_FILE} (megatron-core <= 0.16) nor a {COMMON_STATE_KEY!r} "
                              f"object in .metadata (megatron-core >= 0.17): an incomplete torch_dist checkpoint")
    if len(found) > 1 or not _is_byte_object(md.state_dict_metadata.get(COMMON_STATE_KEY)):
        raise CheckpointError(f"{it_dir}: .metadata describes {COMMON_STATE_KEY!r} as {len(found)} entries of "
                              f"{type(md.state_dict_metadata.get(COMMON_STATE_KEY)).__name__}; megatron-core "
                              f"writes one byte object")
    info = found[0][1]
    path = os.path.join(it_dir, info.relative_path)
    where = f"{path} (byte object {COMMON_STATE_KEY!r})"
    data = _read_byte_object(path, info, where)
    common = (peek_torch_bytes if light else load_torch_bytes)(data, where, policy)
    if not (isinstance(common, list) and len(common) == 1 and isinstance(common[0], dict)):
        raise CheckpointError(f"{where}: holds {type(common).__name__}, not the [common state dict] megatron-core "
                              f"saves")
    return common[0]


def _read_byte_object(path: str, info, where: str) -> bytes:
    """The raw bytes of one byte object (exactly `info.length` at `info.offset`), refusing transforms."""
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{where}: stored through transforms {info.transform_descriptors}; such an "
                              f"object cannot be vetted before PyTorch unpickles it, so it is refused")
    try:
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e})") from None
    if len(data) != info.length:
        raise CheckpointError(f"{where}: truncated ({len(data)} of {info.length} bytes at offset {info.offset})")
    return data


def vet_byte_objects(root: str, md, policy: PolicyLike = None) -> int:
    """Scan every byte object of the index (torch.save payloads inside the .distcp files: `_extra_state`, RNG and
    optimizer objects) under the policy. PyTorch DCP loads them with `torch.load(weights_only=False)`, so this
    scan is all that stands between a crafted .distcp file and code execution. Returns how many were scanned."""
    it_dir = iteration_dir(root)
    count = 0
    for index, info in (md.storage_data or {}).items():
        if not _is_byte_object(md.state_dict_metadata.get(index.fqn)):
            continue
        path = os.path.join(it_dir, info.relative_path)
        where = f"{path} (byte object {index.fqn!r})"
        scan_torch_bytes(_read_byte_object(path, info, where), where, policy)
        count += 1
    return count


def validate(root: str, policy: PolicyLike = None, *, light: bool = False) -> dict:
    """Check that every file the index names exists and is long enough and that every pickle in the checkpoint
    (common.pt or the common_state object, .metadata, byte objects) passes the trust policy; return the common
    state dict. `light`: read through checkpoint_tools.pickle_peek (stand-ins, no torch import)."""
    return _validate(root, policy, light, light)[0]


def validate_index(root: str, policy: PolicyLike = None) -> tuple[dict, object]:
    """`validate`, returning the common state (loaded by torch) and the DCP index, read once, as pickle_peek
    stand-ins: vetted the same way, and torch.distributed.checkpoint (1-2 s of imports) is never needed."""
    return _validate(root, policy, False, True)


def _validate(root: str, policy: PolicyLike, light: bool, light_index: bool) -> tuple[dict, object]:
    it_dir = iteration_dir(root)
    with open(os.path.join(it_dir, "metadata.json")) as f:
        meta = json.load(f)
    if meta.get("sharded_backend") != "torch_dist":
        raise CheckpointError(f"{it_dir}: sharded_backend={meta.get('sharded_backend')!r}; only torch_dist is supported")
    if any(n.startswith("mp_rank_") for n in os.listdir(it_dir)):
        raise CheckpointError(f"{it_dir}: holds both torch_dist files and legacy mp_rank_* folders; separate them")
    has_file = os.path.exists(os.path.join(it_dir, COMMON_FILE))
    load = peek_torch_file if light else load_torch_file
    common = load(os.path.join(it_dir, COMMON_FILE), policy, mmap=False) if has_file else None
    md = read_dcp_metadata(root, policy, light=light_index)
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
    if common is None:
        common = _common_from_shards(it_dir, md, policy, light)
    vet_byte_objects(root, md, policy)
    return common, md


def tensor_index(root: str, policy: PolicyLike = None, *, light: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], Optional[str]]]:
    """Global key -> (global shape, dtype name) for every tensor in the checkpoint (no tensor data read)."""
    md = read_dcp_metadata(root, policy, light=light)
    out = {}
    for key, m in md.state_dict_metadata.items():
        size = getattr(m, "size", None)
        if size is None:
            continue  # bytes objects (e.g. _extra_state, optimizer step counters)
        out[key] = (tuple(size), str(m.properties.dtype).replace("torch.", ""))
    return out


def dist_load(sharded_state_dict: dict, root: str, policy: PolicyLike = None) -> dict:
    """megatron.core.dist_checkpointing.load of a vetted checkpoint: every pickle passes the policy first (in this
    process, right before megatron-core reads the files), and the common state is handed over already loaded, so
    megatron-core never unpickles it itself (whichever layout holds it)."""
    import copy
    import inspect

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization

    common = validate(root, trust_policy(policy))
    it_dir = iteration_dir(root)

    if "common_strategy" in inspect.signature(dist_checkpointing.load).parameters:  # megatron-core <= 0.16
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

        class VettedCommon(TorchCommonLoadStrategy):
            def load_common(self, checkpoint_dir):
                return copy.deepcopy(common)  # megatron-core merges loaded state into it

        return dist_checkpointing.load(sharded_state_dict, it_dir, common_strategy=VettedCommon())
    # megatron-core >= 0.17 takes no common strategy: `load` calls serialization.load_common_state_dict, which
    # would hand common_state to DCP; our vetted copy stands in for it during this call.
    own = serialization.load_common_state_dict
    serialization.load_common_state_dict = lambda checkpoint_dir: copy.deepcopy(common)
    try:
        return dist_checkpointing.load(sharded_state_dict, it_dir)
    finally:
        serialization.load_common_state_dict = own
