"""Hugging Face weights saved by `torch.save` (`pytorch_model.bin`, or shards listed by its index), read safely.

Older checkpoints and many fine-tunes ship only `.bin` files: pickles. Each shard goes through the pickle trust
policy (checkpoint_tools.pickle_trust: opcode scan, then `torch.load(weights_only=True)` with the allow-list) and is
memory-mapped, so nothing runs and nothing is read until a tensor is used. `TorchBinDir` offers the reading side of
`SafetensorsDir` (names, spec, get, release), so the family tables and converters do not care which format a
folder holds. `open_hf_weights` picks one: safetensors wins when both are present (it needs no trust at all).
With `peek=True` the shards are read by checkpoint_tools.pickle_peek instead (the same trust policy, tensors as
shape/dtype records, no torch import): names and `shape_and_dtype` only, for `inspect`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.lazy_torch import torch
from checkpoint_tools.pickle_peek import TensorRecord, peek_torch_file
from checkpoint_tools.pickle_trust import PolicyLike, load_torch_file, trust_policy
from checkpoint_tools.safetensors_io import INDEX_NAME, SINGLE_NAME, SafetensorsDir, TensorSpec

log = logging.getLogger(__name__)

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# What a Hugging Face weights folder may hold, in the order they are preferred.
WEIGHT_LAYOUTS = (INDEX_NAME, SINGLE_NAME, BIN_INDEX_NAME, BIN_NAME)


def _read_weight_map(path: str, index_name: str) -> dict[str, str]:
    index = os.path.join(path, index_name)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable index with a 'weight_map' ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


class TorchBinDir:
    """`pytorch_model.bin` or its shards: every shard vetted and loaded weights-only (memory-mapped) up front, so a
    hostile, truncated or missing shard fails before anything is converted; one shard is kept open at a time."""

    storage = "pytorch_model.bin"

    def __init__(self, path: str, policy: PolicyLike = None, *, peek: bool = False):
        """`peek`: read shapes and dtypes without torch (pickle_peek); `get` and `spec` are then unavailable."""
        self.path = path
        self.policy = trust_policy(policy)
        self.peek = peek
        weight_map: Optional[dict[str, str]] = None
        if os.path.exists(os.path.join(path, BIN_INDEX_NAME)):
            weight_map = _read_weight_map(path, BIN_INDEX_NAME)
            self.files = sorted(set(weight_map.values()))
            missing = [fn for fn in self.files if not os.path.exists(os.path.join(path, fn))]
            if missing:
                raise CheckpointError(f"{path}: shards listed in {BIN_INDEX_NAME} are missing: {missing}")
        else:
            self.files = [BIN_NAME]
        self._specs: dict[str, TensorSpec] = {}
        self._file_of: dict[str, str] = {}
        for fn in self.files:
            for name, t in self._load(fn).items():
                if name in self._file_of:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {self._file_of[name]} and {fn}")
                # a TensorRecord's dtype prints as torch's does ('torch.bfloat16'); `spec` turns it into torch's
                self._specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
                self._file_of[name] = fn
        if weight_map is not None:
            absent = [n for n, fn in weight_map.items() if self._file_of.get(n) != fn]
            if absent:
                raise CheckpointError(f"{path}: tensors in {BIN_INDEX_NAME} are not in their shard: {absent[:20]}")
        self._open: tuple[Optional[str], dict] = (None, {})

    def _load(self, fn: str) -> dict[str, Any]:
        shard = os.path.join(self.path, fn)
        sd = (peek_torch_file if self.peek else load_torch_file)(shard, self.policy, mmap=True)
        tensor = TensorRecord if self.peek else torch.Tensor
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, tensor) for k, v in sd.items()):
            raise CheckpointError(f"{shard}: not a state dict of named tensors ({type(sd).__name__})")
        return sd

    def names(self) -> list[str]:
        return list(self._file_of)

    def spec(self, name: str) -> TensorSpec:
        self._refuse_peek("spec")
        return self._specs[name]

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """The shape and torch's dtype name ('bfloat16'), peeked or loaded alike."""
        s = self._specs[name]
        return s.shape, str(s.dtype).replace("torch.", "")

    def _refuse_peek(self, what: str) -> None:
        if self.peek:
            raise TypeError(f"{self.path}: opened with peek=True (shapes and dtypes only): no {what}")

    def get(self, name: str) -> torch.Tensor:
        self._refuse_peek("tensor data")
        fn = self._file_of.get(name)
        if fn is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        if self._open[0] != fn:  # tensors already handed out keep their own shard's map alive
            self._open = (fn, self._load(fn))
        return self._open[1][name]

    def release(self) -> None:
        """Nothing to drop: tensors are views of a read-only map, whose pages the kernel reclaims as needed."""


def weight_files_found(path: str) -> list[str]:
    """Files in `path` that look like weights or a weights index (for error messages)."""
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
    return sorted(f for f in os.listdir(path) if f.endswith(suffixes))


def is_hf_checkpoint(path: str) -> bool:
    """config.json beside weights: safetensors, pytorch_model.bin (or their index), or any other weight file (which
    `open_hf_weights` then names in its error)."""
    return os.path.isfile(os.path.join(path, "config.json")) and bool(weight_files_found(path))


def has_hf_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_LAYOUTS)


def open_hf_weights(path: str, policy: PolicyLike = None, *,
                    peek: bool = False) -> Union[SafetensorsDir, TorchBinDir]:
    """The weights of a Hugging Face folder: safetensors when present (logged when .bin files are there too),
    else `pytorch_model.bin` through the trust policy; else an error naming what was looked for and found.
    `peek`: .bin shards as shapes and dtypes only, read without torch (safetensors headers always are)."""
    safetensors = any(os.path.exists(os.path.join(path, n)) for n in (INDEX_NAME, SINGLE_NAME))
    torch_bin = any(os.path.exists(os.path.join(path, n)) for n in (BIN_INDEX_NAME, BIN_NAME))
    if safetensors:
        if torch_bin:
            log.warning("%s holds both safetensors and pytorch_model.bin weights; reading the safetensors", path)
        return SafetensorsDir(path)
    if torch_bin:
        return TorchBinDir(path, policy, peek=peek)
    found = weight_files_found(path)
    raise CheckpointError(f"{path}: no weights: looked for {', '.join(WEIGHT_LAYOUTS)}; found "
                          f"{found if found else 'no weight files'}")


def storage_format(weights: Union[SafetensorsDir, TorchBinDir]) -> str:
    """'safetensors (2 files)' or 'pytorch_model.bin (1 file)': what `inspect` reports."""
    kind = "pytorch_model.bin" if isinstance(weights, TorchBinDir) else "safetensors"
    n = len(weights.files)
    return f"{kind} ({n} file{'s' if n != 1 else ''})"
