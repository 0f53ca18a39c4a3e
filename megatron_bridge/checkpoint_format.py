"""Which checkpoint format a folder holds, from its file names alone.

Its own module so that `inspect` (and anything else that only looks) can ask without importing the converters,
which bring torch: everything here reads names and small files.
"""
from __future__ import annotations

import os

from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.torch_bin_io import is_hf_checkpoint  # not hf_checkpoint: no family tables to look
from megatron_bridge import legacy_format, torch_dist_format


def detect_format(path: str) -> str:
    """'hf', 'megatron_legacy' or 'megatron_torch_dist'; raises for anything else or for a mix."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    found = []
    if is_hf_checkpoint(path):
        found.append("hf")
    if legacy_format.is_legacy_checkpoint(path):
        found.append("megatron_torch_dist" if torch_dist_format.is_torch_dist_checkpoint(path) else "megatron_legacy")
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds more than one checkpoint format ({found}); separate them")
    if not found:
        raise CheckpointError(f"{path}: neither a Hugging Face checkpoint (config.json + model.safetensors or "
                              f"pytorch_model.bin, or their index) nor a "
                              f"Megatron checkpoint ({legacy_format.TRACKER})")
    return found[0]
