"""Read what a checkpoint pickle describes without importing torch: tensors become shape/dtype records.

`inspect` only needs a checkpoint's args, its tensors' shapes and dtypes and the DCP index, yet loading them with
`torch.load` costs the torch import (about 2 s of CPU) and, for torch_dist, torch.distributed.checkpoint (1 s more).
This module unpickles the same files into light stand-ins instead:

- the same trust policy vets the file first (`pickle_trust.scan_pickle`: every global, call and persistent id),
  and the loader resolves only the policy's exact pairs, so a pickle this module accepts is one `torch.load` under
  the policy would accept too;
- no global is ever imported: torch's tensor-rebuild functions return a `TensorRecord` (shape and dtype, the dtype
  taken from the persistent storage id), dtypes and layouts become `TorchName` placeholders that print as torch
  prints them (`torch.bfloat16`), `torch.Size` a tuple, and every other allowed class (DCP metadata classes,
  megatron-core enums, numpy RNG state, globals a user trusts) an empty `StandIn` subclass that keeps the
  arguments and pickled state it was built with;
- the harmless standard-library values a checkpoint holds (argparse.Namespace, OrderedDict, set, bytes spelled
  through `_codecs.encode`, ...) are built for real, from this module's own table.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import io
import pathlib
import pickle
import types
from dataclasses import dataclass
from typing import Any

from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.pickle_trust import (PolicyLike, TrustPolicy, _zip_pickle, read_file_bytes, scan_pickle,
                                           trust_policy)

# torch's legacy storage class (named in a tensor's persistent id) -> the dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


@dataclass(frozen=True)
class TorchName:
    """A torch value known by name only (a dtype, layout or memory format): prints as torch prints it."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"

    __repr__ = __str__


@dataclass(frozen=True)
class TensorRecord:
    """A tensor's shape and dtype, read from its pickle; its data is never touched."""

    shape: tuple
    dtype: TorchName

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _StorageRecord:
    dtype: TorchName


class StandIn:
    """An object of an allowed class, built without importing that class: the arguments it was called with and the
    state pickle set on it (as attributes when the state is a dict, as `_state` otherwise)."""

    origin: tuple[str, str] = ("?", "?")

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.__dict__["_args"] = args
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ values)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in {self.origin[0]}.{self.origin[1]}>"


class _TensorProperties(StandIn):
    """DCP's TensorProperties pickles its fields as a tuple (its own __getstate__), not as a dict."""

    origin = ("torch.distributed.checkpoint.metadata", "TensorProperties")
    _FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == len(self._FIELDS):
            state = dict(zip(self._FIELDS, state))
        super().__setstate__(state)


_STAND_IN_CLASSES: dict[tuple[str, str], type] = {_TensorProperties.origin: _TensorProperties}


def stand_in_class(module: str, name: str) -> type:
    """The one StandIn subclass standing for `module.name` (the same class for every file, so they compare)."""
    key = (module, name)
    if key not in _STAND_IN_CLASSES:
        _STAND_IN_CLASSES[key] = type(name, (StandIn,), {"origin": key, "__qualname__": name,
                                                         "__module__": __name__})
    return _STAND_IN_CLASSES[key]


def is_stand_in(obj: Any, module: str, name: str) -> bool:
    """Whether `obj` stands for an object of `module.name` (its class says so: pickled state cannot change that)."""
    return isinstance(obj, StandIn) and type(obj).origin == (module, name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRecord:
    return TensorRecord(tuple(size), storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> TensorRecord:
    return TensorRecord(tuple(size), dtype)


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad) -> TensorRecord:
    return TensorRecord(tuple(size), dtype)


def _first(data, *_ignored):  # a Parameter rebuilt around its data: the record of the data
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _get_layout(name: str) -> TorchName:
    module, _, attr = name.rpartition(".")
    return TorchName(module, attr)


# What each allowed global becomes here, by exact (module, name); any other allowed pair becomes a StandIn class.
_LIGHT: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("torch._utils", "_rebuild_parameter_with_state"): _first,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta_tensor_no_storage,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): codecs.encode,
    ("argparse", "Namespace"): argparse.Namespace,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("io", "BytesIO"): io.BytesIO,
    ("_io", "BytesIO"): io.BytesIO,
}


def light_global(module: str, name: str) -> Any:
    """The stand-in of an allowed global (the caller has checked the policy); never imports `module`."""
    if (module, name) in _LIGHT:
        return _LIGHT[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageRecord(TorchName("torch", _STORAGE_DTYPES[name]))
    if module == "torch" and name[:1].islower():  # dtypes, layouts and memory formats: values, not classes
        return TorchName(module, name)
    return stand_in_class(module, name)


_UNTYPED_STORAGES = {("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage")}


class _PeekUnpickler(pickle.Unpickler):
    """Resolves only the policy's exact pairs, each to its stand-in; tensor storages to their dtype."""

    def __init__(self, file, policy: TrustPolicy, torch_storages: bool):
        super().__init__(file)
        self._policy, self._torch_storages = policy, torch_storages

    def find_class(self, module: str, name: str) -> Any:
        if not self._policy.allows(module, name):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return light_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not self._torch_storages:
            raise pickle.UnpicklingError("persistent ids are not allowed in a plain pickle")
        storage = pid[1] if isinstance(pid, tuple) and len(pid) >= 2 else None
        if isinstance(storage, _StorageRecord):
            return storage
        if isinstance(storage, type) and issubclass(storage, StandIn) and storage.origin in _UNTYPED_STORAGES:
            return _StorageRecord(TorchName("torch", "uint8"))
        raise pickle.UnpicklingError(f"persistent id {pid!r} is not torch's ('storage', <storage type>, ...) form")


def _peek(data: bytes, where: str, policy: TrustPolicy, torch_storages: bool) -> Any:
    scan_pickle(data, where, policy, torch_storages=torch_storages)  # the same vetting as every torch load
    try:
        return _PeekUnpickler(io.BytesIO(data), policy, torch_storages).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure past the scan means the pickle is damaged
        raise CheckpointError(f"{where}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def peek_torch_file(path: str, policy: PolicyLike = None, **_ignored) -> Any:
    """A torch.save file (rank file, common.pt) as stand-ins: what `load_torch_file` returns, tensors as
    `TensorRecord`s (accepts and ignores `mmap`, so it can stand in for that loader)."""
    return _peek(_zip_pickle(path, path), path, trust_policy(policy), torch_storages=True)


def peek_torch_bytes(data: bytes, where: str, policy: PolicyLike = None) -> Any:
    """A torch.save payload held in memory (a byte object of a `.distcp` file) as stand-ins."""
    return _peek(_zip_pickle(data, where), where, trust_policy(policy), torch_storages=True)


def peek_pickle_file(path: str, policy: PolicyLike = None) -> Any:
    """A plain pickle (the DCP `.metadata` index) as stand-ins of its classes."""
    return _peek(read_file_bytes(path), path, trust_policy(policy), torch_storages=False)

