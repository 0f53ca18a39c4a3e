"""Load Megatron pickles without running arbitrary code: `weights_only=True` plus an explicit allow-list.

Megatron checkpoints pickle an `argparse.Namespace` of training args (which holds a few megatron-core enums), and
the RNG state (numpy arrays). Those classes are allowed; anything else is refused with its name, so a user can
decide to trust it (`extra_globals`) instead of us unpickling it blindly.
"""
from __future__ import annotations

import argparse
import importlib
import pickle
from typing import Any, Iterable

import torch

from checkpoint_tools.safetensors_io import CheckpointError

_ALLOWED_PATHS = [
    "argparse.Namespace",
    "_io.BytesIO",
    "io.BytesIO",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.enums.Fp8Recipe",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Float64DType",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
]


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def safe_torch_load(path: str, *, mmap: bool = True, extra_globals: Iterable[str] = ()) -> Any:
    """torch.load with weights_only and the allow-list; tensors stay memory-mapped when `mmap`.

    The pickle is scanned for the globals it names first, so a refusal lists all of them at once and only the
    allowed modules it needs are imported (megatron-core's import alone costs seconds).
    """
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - zip or pickle damage both mean the file is unusable
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({e})") from None
    allowed = set(_ALLOWED_PATHS) | set(extra_globals)
    refused = sorted(g for g in needed if g not in allowed)
    if refused:
        raise CheckpointError(
            f"{path}: refused to unpickle globals outside the allow-list: {refused}. If you trust this file, "
            f"pass --allow-global MODULE.NAME for each")
    objects = [argparse.Namespace]
    for g in needed:
        obj = _resolve(g)
        if obj is None:
            raise CheckpointError(f"{path}: needs {g}, which cannot be imported here")
        objects.append(obj)
    try:
        with torch.serialization.safe_globals(objects):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by the weights-only unpickler ({e})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({e})") from None
