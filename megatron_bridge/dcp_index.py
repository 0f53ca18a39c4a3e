"""PyTorch DCP's index (`.metadata`) built and pickled without importing torch.distributed.checkpoint.

Importing torch.distributed.checkpoint (for its metadata dataclasses) pulls in DTensor and its op registry: about
1-2 s of CPU, a large share of converting a small model. The index is only a pickle of plain dataclasses, so the
writer builds it from stand-ins named like DCP's classes, holding the same state in the same order, and a pickler
that writes each stand-in class as the global DCP would have written: `pickle.load` of the result (by DCP,
megatron-core, or our reader) gets the real classes. `tests/test_torch_dist_stream.py` checks that the bytes equal
`pickle.dumps` of the same index built from the real classes.
"""
from __future__ import annotations

import pickle
from typing import Optional

import torch

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


def _stand_in(module: str, name: str) -> type:
    return type(name, (), {"_dcp_global": (module, name)})


class _MemFormat:
    """DCP's `_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT` (an Enum member pickles as its class called on its
    value)."""

    _dcp_global = (_METADATA, "_MEM_FORMAT_ENCODING")

    def __reduce_ex__(self, protocol):
        return type(self), (0,)


_CONTIGUOUS = _MemFormat()


class _Props:
    """TensorProperties(dtype=...), which pickles its fields as a tuple (its own __getstate__)."""

    _dcp_global = (_METADATA, "TensorProperties")

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __reduce_ex__(self, protocol):
        import copyreg

        return copyreg.__newobj__, (type(self),), (self.dtype, torch.strided, False, _CONTIGUOUS, False)


_CLASSES = {name: _stand_in(_METADATA, name) for name in ("ChunkStorageMetadata", "TensorStorageMetadata",
                                                          "BytesStorageMetadata", "StorageMeta", "Metadata",
                                                          "MetadataIndex")}
_CLASSES["_StorageInfo"] = _stand_in(_FILESYSTEM, "_StorageInfo")


def _make(name: str, **state):
    obj = _CLASSES[name]()
    obj.__dict__.update(state)
    return obj


# Constructors with DCP's field order (the order their __dict__, hence the pickle, holds them in).
def chunk(offsets, sizes):
    return _make("ChunkStorageMetadata", offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def tensor_metadata(dtype: torch.dtype, size, chunks: list):
    return _make("TensorStorageMetadata", properties=_Props(dtype), size=torch.Size(size), chunks=chunks)


def bytes_metadata():
    return _make("BytesStorageMetadata")


def index(fqn: str, offset: Optional[tuple] = None):
    """MetadataIndex(fqn, offset): its __init__ sets fqn, index, then offset only when given."""
    obj = _make("MetadataIndex", fqn=fqn, index=None)
    if offset is not None:
        obj.__dict__["offset"] = torch.Size(offset)
    return obj


def storage_info(relative_path: str, offset: int, length: int):
    """_StorageInfo, whose __getstate__ drops fields that are None (transform_descriptors)."""
    return _make("_StorageInfo", relative_path=relative_path, offset=offset, length=length)


def metadata(state_dict_metadata: dict, storage_data: dict, save_id: str, version: str):
    meta = _make("StorageMeta", checkpoint_id=None, save_id=save_id, load_id=None, modules=[])
    return _make("Metadata", state_dict_metadata=state_dict_metadata, planner_data=None, storage_data=storage_data,
                 storage_meta=meta, version=version)


class _IndexPickler(pickle._Pickler):
    """The reference pickler, writing each stand-in class as the DCP global it stands for."""

    def save_global(self, obj, name=None):
        target = obj.__dict__.get("_dcp_global") if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


def dump(md, f) -> None:
    """Pickle the index as `pickle.dump(md, f)` of DCP's own classes would."""
    _IndexPickler(f, pickle.DEFAULT_PROTOCOL).dump(md)
