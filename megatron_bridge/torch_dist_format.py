"""Megatron `torch_dist` checkpoints (megatron.core.dist_checkpointing over PyTorch DCP), read and written safely.

    <root>/latest_checkpointed_iteration.txt
    <root>/release/ or <root>/iter_0000100/
        metadata.json              {"sharded_backend": "torch_dist", ...}
        common.pt                  args, checkpoint_version, iteration (a torch pickle: loaded weights-only)
        .metadata                  DCP index of every tensor shard (a plain pickle: vetted by a restricted unpickler
                                   before megatron-core reads it)
        __R_I.distcp               tensor data written by rank R

Tensors are stored by global, layout-free keys (layers stacked on a leading axis), so a checkpoint saved at one
TP/PP is loaded at another: megatron-core reshards at load. Saving and loading therefore run inside real
megatron-core models under torchrun (see mcore_worker); this module holds the format facts and the safety checks.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any, Optional

from checkpoint_tools.safetensors_io import CheckpointError
from megatron_bridge.legacy_format import TRACKER, iteration_dir_name, read_tracker
from megatron_bridge.safe_load import safe_torch_load

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


class _DcpUnpickler(pickle.Unpickler):
    """Only the plain-data classes a DCP `.metadata` index is made of."""

    _TORCH = {"Size", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
              "float8_e4m3fn", "float8_e5m2", "strided", "contiguous_format", "channels_last", "preserve_format"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module == "torch" and name in self._TORCH) \
                or (module == "collections" and name == "OrderedDict") \
                or (module == "torch.serialization" and name == "_get_layout") \
                or (module == "builtins" and name in {"set", "frozenset", "slice", "tuple", "list", "dict"}):
            return super().find_class(module, name)
        raise CheckpointError(f".metadata refers to {module}.{name}, which a DCP index never needs; refused")


def read_dcp_metadata(root: str):
    """The DCP index (torch.distributed.checkpoint.metadata.Metadata), unpickled with the restricted unpickler."""
    path = os.path.join(iteration_dir(root), ".metadata")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _DcpUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage means the index is unusable
        raise CheckpointError(f"{path}: truncated or corrupt DCP index ({e})") from None


def read_common(root: str) -> dict:
    path = os.path.join(iteration_dir(root), "common.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: an incomplete torch_dist checkpoint")
    return safe_torch_load(path, mmap=False)


def validate(root: str) -> dict:
    """Check that every file the index names exists and is long enough; return the common state dict."""
    it_dir = iteration_dir(root)
    with open(os.path.join(it_dir, "metadata.json")) as f:
        meta = json.load(f)
    if meta.get("sharded_backend") != "torch_dist":
        raise CheckpointError(f"{it_dir}: sharded_backend={meta.get('sharded_backend')!r}; only torch_dist is supported")
    if any(n.startswith("mp_rank_") for n in os.listdir(it_dir)):
        raise CheckpointError(f"{it_dir}: holds both torch_dist files and legacy mp_rank_* folders; separate them")
    common = read_common(root)
    md = read_dcp_metadata(root)
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
    return common


def tensor_index(root: str) -> dict[str, tuple[tuple[int, ...], Optional[str]]]:
    """Global key -> (global shape, dtype name) for every tensor in the checkpoint (no tensor data read)."""
    md = read_dcp_metadata(root)
    out = {}
    for key, m in md.state_dict_metadata.items():
        size = getattr(m, "size", None)
        if size is None:
            continue  # bytes objects (e.g. _extra_state, optimizer step counters)
        out[key] = (tuple(size), str(m.properties.dtype).replace("torch.", ""))
    return out
