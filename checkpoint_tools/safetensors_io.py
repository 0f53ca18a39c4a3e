"""Streaming safetensors I/O: read tensors as views of a memory map, write them one at a time.

Neither side ever holds a whole model. The reader validates every header against the file size first, so a
truncated shard fails before anything is converted; the writer plans shard boundaries from shapes alone, writes
each shard's header up front and then appends tensor bytes as they arrive. Headers are parsed without torch
(`shape_and_dtype` names dtypes as torch does), so `inspect` describes a folder without importing it.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from checkpoint_tools.dtype_names import SAFETENSORS_DTYPES, itemsize, torch_name
from checkpoint_tools.errors import CheckpointError  # noqa: F401 - re-exported for older imports
from checkpoint_tools.lazy_torch import torch  # headers are read without torch; tensors import it
from checkpoint_tools.vectored_io import row_segments, writev_all


class _TorchTable(Mapping):
    """A table over torch dtypes, built at first use: parsing a header (`inspect`) never imports torch."""

    def __init__(self, build: Callable[[], dict]):
        self._build, self._table = build, None

    def _get(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


DTYPES = _TorchTable(lambda: {code: getattr(torch, name) for code, (name, _) in SAFETENSORS_DTYPES.items()})
DTYPE_NAMES = _TorchTable(lambda: {v: k for k, v in DTYPES.items()})
INDEX_NAME = "model.safetensors.index.json"
WRITE_CHUNK = 64 * 1024**2
# Bytes handed to the writer thread and not yet written: what overlapping costs in memory, at most.
WRITE_BEHIND_BYTES = 512 * 1024**2
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _check_entry(path: str, name: str, e, data_bytes: int) -> None:
    """One header entry must describe a tensor that lies inside the file and whose byte count matches its shape:
    a damaged header is refused here, by name, instead of failing later in a reshape or reading another tensor's
    bytes."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged safetensors header: tensor {name!r} {why}")

    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise bad("lacks dtype/shape/data_offsets")
    if e["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}")
    if offsets[1] > data_bytes:
        raise CheckpointError(f"{path}: truncated (tensor {name} ends at byte {offsets[1]} of the data, "
                              f"the file holds {data_bytes})")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * itemsize(e["dtype"]):
        raise bad(f"spans {offsets[1] - offsets[0]} bytes, its shape {shape} of {e['dtype']} needs "
                  f"{numel * itemsize(e['dtype'])}")


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `get` returns zero-copy views."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{path}: damaged safetensors header (not JSON: {e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        self._entries = header
        for name, e in header.items():
            _check_entry(path, name, e, size - self._data_start)

    def names(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        e = self._entries[name]
        return TensorSpec(name, tuple(e["shape"]), DTYPES[e["dtype"]])

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """The shape and torch's dtype name ('bfloat16') from the header alone: no torch import."""
        e = self._entries[name]
        return tuple(e["shape"]), torch_name(e["dtype"])

    def get(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        with warnings.catch_warnings():
            # The map is read-only; callers copy what they keep and never write into these views.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // itemsize,
                                    offset=self._data_start + begin)
        return flat.view(shape)

    def release(self) -> None:
        """Drop this process's resident pages of the map (the page cache keeps them); views stay valid."""
        if self._mm is not None and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)


class SafetensorsDir:
    """A Hugging Face weights folder: `model.safetensors` or shards listed by `model.safetensors.index.json`."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [fn for fn in files if not os.path.exists(os.path.join(path, fn))]
            if missing:
                raise CheckpointError(f"{path}: shards listed in {INDEX_NAME} are missing: {missing}")
        elif os.path.exists(os.path.join(path, SINGLE_NAME)):
            files, weight_map = [SINGLE_NAME], None
        else:
            bins = [f for f in os.listdir(path) if f.endswith(".bin") or f.endswith(".pt")]
            hint = f" (found {bins}; re-save with safe_serialization=True)" if bins else ""
            raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self.files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in files}
        self._where: dict[str, SafetensorsFile] = {}
        for fn, sf in self.files.items():
            for name in sf.names():
                self._where[name] = sf
        if weight_map is not None:
            absent = [n for n, fn in weight_map.items() if n not in self.files[fn].names()]
            if absent:
                raise CheckpointError(f"{path}: tensors in {INDEX_NAME} are not in their shard: {absent[:20]}")

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> TensorSpec:
        return self._where[name].spec(name)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._where[name].shape_and_dtype(name)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._where[name].get(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def release(self) -> None:
        for sf in self.files.values():
            sf.release()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class _WriteBehind:
    """One background thread that runs file operations in the order they are submitted.

    The caller (the converter's main thread) builds the next tensor while this thread writes the previous one:
    write() releases the GIL, so reading and transforming overlap the writing. At most `budget` bytes wait here
    (a bigger tensor waits until the thread is idle, so it alone is in flight), which bounds the extra memory.
    The first error is kept, later operations are skipped, and the error is raised in the caller at its next
    submit or at drain."""

    def __init__(self, budget: Optional[int] = None):
        self._budget = WRITE_BEHIND_BYTES if budget is None else budget
        self._pending = 0
        self._error: Optional[BaseException] = None
        self._cv = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            op, nbytes = item
            try:
                if self._error is None:
                    op()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                del op, item
                with self._cv:
                    self._pending -= nbytes
                    self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, op, nbytes: int = 0) -> None:
        self._raise()
        with self._cv:
            while self._pending and self._pending + nbytes > self._budget:
                self._cv.wait()
            self._pending += nbytes
        self._queue.put((op, nbytes))

    def drain(self) -> None:
        """Wait until everything submitted is done; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()


class ShardedSafetensorsWriter:
    """Writes tensors in a pre-declared order into HF-style shards, holding one tensor at a time (plus at most
    WRITE_BEHIND_BYTES that a background thread is still writing).

    Usage: construct with the full ordered spec list, call `write(name, tensor)` for each in order, then `close()`.
    """

    def __init__(self, out_dir: str, specs: list[TensorSpec], max_shard_bytes: int = 2 * 1024**3,
                 metadata: Optional[dict] = None):
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = [SINGLE_NAME] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._pos = 0
        self._f = None  # the open shard; used by the writer thread only
        self._shard = -1
        self._io: Optional[_WriteBehind] = None
        self.total_bytes = sum(s.nbytes for s in specs)

    def _open_shard(self, i: int) -> None:
        if self._f is not None:
            self._f.close()
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for s in self.shards[i]:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
        self._f = open(os.path.join(self.out_dir, self.file_names[i]), "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def _write_bytes(self, tensor: torch.Tensor) -> None:
        data = tensor.view(torch.uint8).numpy().data
        # Bounded writes: one multi-GB write() into the page cache ran several times slower here than the
        # same bytes in 64 MB pieces.
        for i in range(0, len(data), WRITE_CHUNK):
            self._f.write(data[i:i + WRITE_CHUNK])

    def _write_side_by_side(self, blocks: list[torch.Tensor]) -> None:
        """Row r of the file's tensor is row r of every block in turn: the rows' bytes go to writev as they lie,
        never copied into a merged tensor."""
        self._f.flush()
        writev_all(self._f.fileno(), row_segments(blocks))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: list[torch.Tensor], dim: int = 0) -> None:
        """Write the tensor that is `parts` concatenated along `dim` without building it: row blocks (dim 0, e.g.
        TP shards of a column-parallel weight) go to the file as they are; column blocks (dim 1, a row-parallel
        weight's shards) row by row, gathered into vectored writes. A non-contiguous block is copied alone."""
        if self._pos >= len(self._queue):
            raise ValueError(f"unexpected tensor {name}: every planned tensor is written")
        i, spec = self._queue[self._pos]
        if name != spec.name:
            raise ValueError(f"tensors must arrive in planned order: expected {spec.name}, got {name}")
        first = parts[0]
        if len(parts) == 1:
            shape = tuple(first.shape)
        elif dim == 0:
            shape = (sum(p.shape[0] for p in parts),) + tuple(first.shape[1:])
        else:
            shape = (first.shape[0], sum(p.shape[1] for p in parts)) if first.dim() == 2 else ()
        same = [j for j in range(first.dim()) if j != dim]
        if (shape != spec.shape or any(p.dtype != spec.dtype for p in parts)
                or any(p.dim() != first.dim() or any(p.shape[j] != first.shape[j] for j in same) for p in parts)):
            got = [f"{tuple(p.shape)} {p.dtype}" for p in parts]
            raise ValueError(f"{name}: got {got[0] if len(got) == 1 else 'blocks ' + ', '.join(got)}, planned "
                             f"{spec.shape} {spec.dtype}")
        if self._io is None:
            self._io = _WriteBehind()
        if i != self._shard:
            self._io.submit(lambda i=i: self._open_shard(i))
            self._shard = i
        if dim == 1 and len(parts) > 1:
            flats = [p.detach().contiguous() for p in parts]
            self._io.submit(lambda flats=flats: self._write_side_by_side(flats), spec.nbytes)
            self._pos += 1
            return
        for part in parts:
            nbytes = part.numel() * part.element_size()
            if nbytes:
                flat = part.detach().reshape(-1).contiguous()
                self._io.submit(lambda flat=flat: self._write_bytes(flat), nbytes)
        self._pos += 1

    def _finish_io(self) -> None:
        if self._io is not None:
            io, self._io = self._io, None
            io.submit(self._close_file)
            io.drain()

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._pos != len(self._queue):
            left = [s.name for _, s in self._queue[self._pos:]]
            self._finish_io()  # the files written so far are complete and closed either way
            raise ValueError(f"{len(left)} planned tensors were never written: {left[:10]}")
        self._finish_io()
        self._close_file()
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {s.name: self.file_names[i] for i, shard in enumerate(self.shards) for s in shard}}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")


def write_tensors(out_dir: str, items: Iterable[tuple[str, torch.Tensor]], specs: list[TensorSpec],
                  max_shard_bytes: int = 2 * 1024**3) -> list[str]:
    """Stream `items` (in `specs` order) into shards; returns the shard file names."""
    w = ShardedSafetensorsWriter(out_dir, specs, max_shard_bytes)
    for name, t in items:
        w.write(name, t)
    w.close()
    return w.file_names
