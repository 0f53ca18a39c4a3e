"""Torch zip checkpoints (what `torch.save` writes, what `torch.load` and Megatron-LM read), streamed one tensor at a
time: the writer of legacy rank files `model_optim_rng.pt`.

Why not `torch.save`: it needs the whole object in memory first (a whole rank's state dict), it pickles a tensor's
whole storage (so a slice of a memory-mapped source had to be cloned first), and it checksums with miniz's CRC-32,
about 3x slower than zlib's and 9x slower than ISA-L's (it was the largest single cost of a conversion). Here each
tensor becomes its own record of exactly its bytes (storage offset 0) as soon as it is `add`ed: a contiguous view
is written straight from the memory it views, no copy, and so are row blocks that make up a tensor (a fused QKV
shard: slices of q, k and v) and column blocks (a row-parallel shard: rows of column slices, with writev); a
background thread writes while the caller builds the next tensor, and a second one computes the CRC-32
(checkpoint_tools.crc32, which releases the GIL) meanwhile. `finish` pickles the object, whose tensors
are by then only stand-ins carrying a record key, dtype, shape and stride, so the pickle is written last.

The bytes follow torch/serialization.py `_save` and caffe2's PyTorchStreamWriter (miniz) as of torch 2.x:

    <archive>/data/0 .. data/N-1     tensor bytes, uncompressed ("stored"), each starting at a multiple of 64
    <archive>/data.pkl               pickle protocol 2: tensors as torch._utils._rebuild_tensor_v2(<persistent id
                                     ('storage', torch.<Dtype>Storage, key, 'cpu', numel)>, 0, size, stride, ...)
    <archive>/.format_version "1"    torch may then compute record offsets itself (records in key order, back to back)
    <archive>/.storage_alignment "64", <archive>/byteorder, <archive>/version "3\\n", <archive>/.data/serialization_id
    central directory, zip64 end record and locator, end record

`<archive>` is the file name without its extension, as torch names it. Each local header carries the general purpose
flags 0x0808 (sizes and CRC in a data descriptor after the data; UTF-8 names) and an extra field "FB" of 'Z' padding
that puts the data at the next multiple of 64 (torch.load(mmap=True) maps records in place); a record of 4 GiB or
more, or one that starts past 4 GiB, gets zip64 extra fields and a 24-byte descriptor, exactly where miniz puts them,
because torch.load can compute offsets from those rules instead of reading each header. The only differences from a
torch.save file: data.pkl comes after the tensors instead of first, a tensor never shares a record with another, and
`.format_version` is left out when the pickle names the records in another order than they were written (torch
then reads each record's offset from its header).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import io
import os
import pickle
import queue
import random
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

import torch

from checkpoint_tools.crc32 import crc32
from checkpoint_tools.vectored_io import memory, row_segments, write_all, writev_all

ZIP64_LIMIT = 0xFFFFFFFF  # miniz's MZ_UINT32_MAX: a size or offset at or above it needs zip64 fields
ALIGNMENT = 64  # torch's storage alignment: record data starts at a multiple of it
FORMAT_VERSION = "3\n"  # the `version` record torch writes for plain tensor payloads
_FLAGS_DESCRIPTOR = 0x0808  # data descriptor follows the data (bit 3) + UTF-8 names (bit 11)
_FLAGS_EMPTY = 0x0800  # miniz writes an empty record without a descriptor
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CRC_IN_THREAD_BYTES = 4 << 20  # below this the CRC thread's hand-off costs more than it saves
_WRITE_CHUNK = 1 << 30  # one write() call at most (Linux writes at most 2 GiB - 4 KiB per call)
MAX_IN_FLIGHT = 512 << 20  # default bytes handed to a writer and not yet written


class TensorRef:
    """What the pickle needs of a tensor already written as record `key`: its dtype, shape and stride."""

    __slots__ = ("key", "dtype", "shape", "stride", "requires_grad", "parameter")

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple, stride: tuple, requires_grad: bool,
                 parameter: bool = False):
        self.key, self.dtype, self.shape, self.stride = key, dtype, shape, stride
        self.requires_grad, self.parameter = requires_grad, parameter

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"TensorRef(data/{self.key}, {self.dtype}, {tuple(self.shape)})"


class _StorageRef:
    """The persistent id torch.load resolves to the record's storage."""

    __slots__ = ("key", "dtype", "nbytes")

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int):
        self.key, self.dtype, self.nbytes = key, dtype, nbytes

    def persistent_id(self) -> tuple:
        if _untyped(self.dtype):
            return ("storage", torch.storage.UntypedStorage, self.key, "cpu", self.nbytes)
        typed = getattr(torch, torch.storage._dtype_to_storage_type_map()[self.dtype])
        return ("storage", typed, self.key, "cpu", self.nbytes // self.dtype.itemsize)


def _untyped(dtype: torch.dtype) -> bool:
    """float8, uint16, ...: torch.save stores these as untyped bytes and names the dtype in the rebuild call
    (`_rebuild_tensor_v3`); the others as a typed storage (`torch.BFloat16Storage`, ...) and `_rebuild_tensor_v2`."""
    return dtype in torch.storage._new_dtypes() or dtype not in torch.storage._dtype_to_storage_type_map()


def _contiguous_stride(shape: tuple) -> tuple:
    """The strides torch gives a fresh tensor of `shape` (its convention for empty and size-1 dimensions)."""
    return torch.empty(shape, device="meta").stride()


def _crc32(views: list[memoryview]) -> int:
    crc = 0
    for view in views:
        crc = crc32(view, crc)
    return crc


class Columns(list):
    """A tensor handed to `RankFileWriter.add` as column blocks: 2-D tensors with the same rows and dtype whose
    concatenation along dim 1 is the tensor (a row-parallel piece: a column slice of one matrix, or the TP shards of
    a row-parallel weight merged). Each block's rows must be contiguous (a column slice's are); the record is
    written row by row straight from the blocks' memory, never built."""


class _Pickler(pickle.Pickler):
    """Pickles like torch.save: tensors as `_rebuild_tensor_v2`/`_v3` over persistent storage ids; a real tensor met
    while pickling is added to the file first."""

    def __init__(self, file, writer: "RankFileWriter"):
        super().__init__(file, protocol=2)
        self._writer = writer
        self.keys_in_order: list[str] = []  # record keys in the order the pickle first names them

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        if type(obj) is _StorageRef:
            self.keys_in_order.append(obj.key)
            return obj.persistent_id()
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            obj = self._writer.add(obj)
        if type(obj) is not TensorRef:
            return NotImplemented
        storage = _StorageRef(obj.key, obj.dtype, obj.nbytes)
        # A Parameter's data is a plain tensor (requires_grad lives on the Parameter), as Parameter.__reduce_ex__ has it.
        requires_grad = obj.requires_grad and not obj.parameter
        args = (storage, 0, tuple(obj.shape), tuple(obj.stride), requires_grad, collections.OrderedDict())
        if _untyped(obj.dtype):
            rebuilt = (torch._utils._rebuild_tensor_v3, args + (obj.dtype,))
        else:
            rebuilt = (torch._utils._rebuild_tensor_v2, args)
        if obj.parameter:  # nn.Parameter: torch.save wraps the tensor's own rebuild in _rebuild_parameter
            return (torch._utils._rebuild_parameter, (_Rebuilt(*rebuilt), obj.requires_grad, collections.OrderedDict()))
        return rebuilt


class _Rebuilt:
    """A tensor's rebuild call nested inside another (a Parameter's data)."""

    __slots__ = ("func", "args")

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _padding(offset: int, name_len: int, nbytes: int, limit: int) -> tuple[bytes, bool]:
    """(zip64 extra field + 'FB' padding extra field, zip64?) of a local header at `offset`, as caffe2's getPadding
    and miniz lay them out: the data starts at the next multiple of ALIGNMENT."""
    big_size, big_offset = nbytes >= limit, offset >= limit
    zip64 = b""
    if big_size or big_offset:
        fields = (struct.pack("<QQ", nbytes, nbytes) if big_size else b"") + (struct.pack("<Q", offset) if big_offset
                                                                              else b"")
        zip64 = struct.pack("<HH", 0x0001, len(fields)) + fields
    start = offset + _LOCAL.size + name_len + len(zip64) + 4
    pad = -start % ALIGNMENT
    return zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad, big_size or big_offset


class RankFileWriter:
    """Writes one torch zip file at `path`: `add(tensor)` per tensor (written in the background, returns its
    stand-in), then `finish(obj)` with the stand-ins (or tensors) in place; use as a context manager so a failure
    stops the background threads (the caller's temp folder then goes away with the half-written file).

    `max_in_flight` bounds the bytes handed over and not yet written (the memory a caller's fresh tensors can hold
    beyond the one it is building); `zip64_limit` lowers miniz's 4 GiB threshold so tests can check zip64 records
    on small files."""

    def __init__(self, path: str, *, max_in_flight: int = MAX_IN_FLIGHT, zip64_limit: int = ZIP64_LIMIT,
                 threads: bool = True):
        self.path = path
        self._archive = os.path.splitext(os.path.basename(path))[0] or "archive"
        self._zip64_limit = zip64_limit
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._offset = 0
        self._small = bytearray()  # headers and descriptors not yet written: one write() with the next data
        self._entries: list[tuple[bytes, int, int, int, bool, int]] = []  # name, offset, size, crc, zip64, flags
        self._keys = 0
        self._max_in_flight = max_in_flight
        self._in_flight = 0  # bytes handed over and not yet written
        self._items = 0  # tensors handed over and not yet written (an empty one holds no bytes but must be waited for)
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._cancelled = False  # set when closed before `finish`: queued tensors are skipped
        self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="crc32") if threads else None
        self._queue: Optional[queue.SimpleQueue] = None
        self._thread: Optional[threading.Thread] = None
        if threads:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="rank-file-writer", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------------------------- public

    def add(self, tensor: Union[torch.Tensor, Sequence[torch.Tensor]]) -> TensorRef:
        """Hand a tensor over as the next record; returns the stand-in to put where the tensor goes in `finish`'s
        object. The writer keeps the tensor (not a copy, unless it is not contiguous) until its bytes are written.

        A list of row blocks (one dtype, the same trailing shape) stands for their concatenation along dim 0: they
        are written one after another as one record, never concatenated in memory (a fused QKV or gate+up shard
        made of slices of the source tensors). `Columns` of 2-D blocks stand for their concatenation along dim 1,
        written row by row (a row-parallel piece)."""
        single = isinstance(tensor, torch.Tensor)
        columns = isinstance(tensor, Columns)
        blocks = [self._prepared(b, rows_only=columns) for b in ([tensor] if single else list(tensor))]
        self._raise_if_failed()
        if columns:
            ref = self._column_concatenation(blocks)
            blocks = Columns(blocks)
        elif single:
            first = blocks[0]
            ref = TensorRef(str(self._keys), first.dtype, tuple(first.shape), tuple(first.stride()),
                            tensor.requires_grad, isinstance(tensor, torch.nn.Parameter))
        else:
            ref = self._concatenation(blocks)
        self._keys += 1
        nbytes = sum(b.numel() * b.element_size() for b in blocks)
        name = f"{self._archive}/data/{ref.key}".encode()
        if self._queue is None:
            self._write_record(name, blocks, nbytes)
            return ref
        with self._cond:
            while self._in_flight and self._in_flight + nbytes > self._max_in_flight and self._error is None:
                self._cond.wait()
            self._in_flight += nbytes
            self._items += 1
        self._raise_if_failed()
        self._queue.put((name, blocks, nbytes))
        return ref

    def _prepared(self, tensor: Any, rows_only: bool = False) -> torch.Tensor:
        """A dense contiguous CPU tensor with the same values (the tensor itself when it already is one); with
        `rows_only`, a 2-D one whose rows are contiguous (a column slice as it is)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.path}: add() takes a tensor or a list of tensors, got {type(tensor).__name__}")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
            raise ValueError(f"{self.path}: cannot write a {type(tensor).__name__} with layout {tensor.layout}; "
                             f"only dense tensors and Parameters (convert it with .to_dense() or plain torch.save)")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg()
        if rows_only:
            if t.dim() != 2:
                raise ValueError(f"{self.path}: column blocks must be 2-D, got shape {tuple(t.shape)}")
            if t.stride(1) != 1 and t.shape[1] > 1:
                t = t.contiguous()
        elif not t.is_contiguous():
            t = t.contiguous()  # a strided view that is not a column block: the one copy it needs
        return t

    def _column_concatenation(self, blocks: list[torch.Tensor]) -> TensorRef:
        """The stand-in of `torch.cat(blocks, dim=1)`, checked as torch.cat would check it."""
        if not blocks or any(b.dtype != blocks[0].dtype or b.shape[0] != blocks[0].shape[0] for b in blocks):
            raise ValueError(f"{self.path}: column blocks {[tuple(b.shape) for b in blocks]} "
                             f"({sorted({str(b.dtype) for b in blocks})}) do not concatenate along dim 1: they "
                             f"need one dtype and the same number of rows")
        shape = (blocks[0].shape[0], sum(b.shape[1] for b in blocks))
        return TensorRef(str(self._keys), blocks[0].dtype, shape, _contiguous_stride(shape), False)

    def _concatenation(self, blocks: list[torch.Tensor]) -> TensorRef:
        """The stand-in of `torch.cat(blocks)`, checked as torch.cat would check it."""
        if not blocks:
            raise ValueError(f"{self.path}: add() got an empty list of row blocks")
        first = blocks[0]
        bad = [tuple(b.shape) for b in blocks if b.dim() == 0 or b.dtype != first.dtype or b.shape[1:] != first.shape[1:]]
        if bad:
            raise ValueError(f"{self.path}: row blocks {[tuple(b.shape) for b in blocks]} "
                             f"({sorted({str(b.dtype) for b in blocks})}) do not concatenate along dim 0: they need "
                             f"one dtype and the same trailing shape")
        shape = (sum(b.shape[0] for b in blocks),) + tuple(first.shape[1:])
        return TensorRef(str(self._keys), first.dtype, shape, _contiguous_stride(shape), False)

    def finish(self, obj: Any) -> str:
        """Pickle `obj` (stand-ins from `add`, tensors, plain values) and close the file; returns its path."""
        buf = io.BytesIO()
        pickler = _Pickler(buf, self)
        pickler.dump(obj)
        self._drain()
        in_order = pickler.keys_in_order == [str(k) for k in range(len(pickler.keys_in_order))]
        serialization_id = f"{random.getrandbits(64):020d}"
        records = [("data.pkl", buf.getvalue())]
        # `.format_version` 1 lets torch compute record offsets by miniz's rules instead of reading each header: only
        # true when the pickle names the records in the order they were written and zip64 starts where miniz's does.
        if in_order and len(pickler.keys_in_order) == self._keys and self._zip64_limit == ZIP64_LIMIT:
            records.append((".format_version", b"1"))
        records += [(".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", sys.byteorder.encode()),
                    ("version", FORMAT_VERSION.encode())]
        for name, data in records:
            self._write_record(f"{self._archive}/{name}".encode(), data, len(data))
        combined = 0
        for entry in self._entries:
            combined = crc32(struct.pack("<I", entry[3]), combined)
        serialization_id += f"{combined:020d}"
        self._write_record(f"{self._archive}/.data/serialization_id".encode(), serialization_id.encode(), 40)
        self._write_central_directory()
        self._flush_small()
        self.close()  # nothing is queued any more: closing only stops the threads
        return self.path

    def close(self) -> None:
        """Stop the threads and close the file (idempotent; `finish` calls it). Closed before `finish` (the caller
        failed), tensors still queued are dropped, not written: the half-written file is going away anyway."""
        if self._closed:
            return
        self._closed = True
        self._cancelled = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._crc_pool is not None:
            self._crc_pool.shutdown()
        os.close(self._fd)

    def __enter__(self) -> "RankFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- internals

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OSError(f"{self.path}: writing failed: {self._error}") from self._error

    def _drain(self) -> None:
        """Wait until every handed-over tensor is on its way to disk."""
        if self._queue is not None:
            with self._cond:
                while self._items and self._error is None:
                    self._cond.wait()
        self._raise_if_failed()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, blocks, nbytes = item
            try:
                if self._error is None and not self._cancelled:
                    self._write_record(name, blocks, nbytes)
            except BaseException as e:  # reported to the caller at its next add/finish
                self._error = e
            finally:
                del blocks, item  # the tensors go now, not when the next item arrives
                with self._cond:
                    self._in_flight -= nbytes
                    self._items -= 1
                    self._cond.notify_all()

    def _write_record(self, name: bytes, data, nbytes: int) -> None:
        """One record: local header (with padding), the bytes (a list of tensors, written one after another, or a
        bytes object), data descriptor; its central directory entry is kept for the end."""
        offset = self._offset
        extra, zip64 = _padding(offset, len(name), nbytes, self._zip64_limit)
        flags = _FLAGS_DESCRIPTOR if nbytes else _FLAGS_EMPTY
        version = 45 if zip64 else 0
        self._emit_small(_LOCAL.pack(0x04034B50, version, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra))
                         + name + extra)
        crc = 0
        if nbytes:
            if isinstance(data, (bytes, bytearray)):
                views = [memoryview(data)]
            elif isinstance(data, Columns):
                views = row_segments(data)
            else:
                views = [memory(t, t.numel() * t.element_size()) for t in data if t.numel()]
            crc = self._write_data(views, nbytes)
            if zip64:
                self._emit_small(struct.pack("<IIQQ", 0x08074B50, crc, nbytes, nbytes))
            else:
                self._emit_small(struct.pack("<IIII", 0x08074B50, crc, nbytes, nbytes))
        self._entries.append((name, offset, nbytes, crc, zip64, flags))

    def _write_data(self, views: list[memoryview], nbytes: int) -> int:
        """Write `views` back to back and return their CRC-32, computed in the CRC thread while they are written."""
        if self._crc_pool is None or nbytes < _CRC_IN_THREAD_BYTES:
            crc = _crc32(views)
            self._write_views(views, nbytes)
            return crc
        future = self._crc_pool.submit(_crc32, views)
        self._write_views(views, nbytes)
        return future.result()

    def _emit_small(self, data: bytes) -> None:
        self._small += data
        self._offset += len(data)

    def _flush_small(self) -> None:
        if self._small:
            self._write_all(memoryview(self._small))
            self._small = bytearray()

    def _write_views(self, views: list[memoryview], nbytes: int) -> None:
        if len(self._small) + nbytes <= (1 << 20):  # small tensors ride along with the headers
            for view in views:
                self._small += view
            self._offset += nbytes
            return
        self._flush_small()
        if len(views) == 1:
            self._write_all(views[0])
        else:  # many segments (rows of column blocks): one writev per IOV_MAX of them, no gathering copy
            writev_all(self._fd, views)
        self._offset += nbytes

    def _write_all(self, view: memoryview) -> None:
        write_all(self._fd, view, _WRITE_CHUNK)

    def _write_central_directory(self) -> None:
        start = self._offset
        limit = self._zip64_limit
        for name, offset, size, crc, zip64, flags in self._entries:
            big_size, big_offset = size >= limit, offset >= limit
            fields = (struct.pack("<QQ", size, size) if big_size else b"") + (struct.pack("<Q", offset) if big_offset
                                                                              else b"")
            extra = struct.pack("<HH", 0x0001, len(fields)) + fields if fields else b""
            size32 = 0xFFFFFFFF if big_size else size
            offset32 = 0xFFFFFFFF if big_offset else offset
            self._emit_small(_CENTRAL.pack(0x02014B50, 0, 45 if zip64 else 0, flags, 0, 0, 0, crc, size32, size32,
                                           len(name), len(extra), 0, 0, 0, 0, offset32) + name + extra)
        size = self._offset - start
        n = len(self._entries)
        eocd64 = self._offset
        # zip64 end of central directory record and locator (torch writes them always), then the classic record.
        self._emit_small(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, size, start))
        self._emit_small(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        self._emit_small(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                     min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF), 0))


def write_torch_file(path: str, obj: Any, **options) -> str:
    """`torch.save(obj, path)` for a state-dict-like object, through `RankFileWriter` (tensors found while pickling
    are written as their own records; no clone of a view)."""
    with RankFileWriter(path, **options) as w:
        return w.finish(obj)


@contextlib.contextmanager
def streaming_quietly():
    """While a checkpoint is streamed (a rank file here; every conversion, around `convert.run_plan`): no cyclic
    garbage collection (it walks the growing heap again and again while nothing cyclic is made) and one torch
    intra-op thread. The copies a conversion makes (a merge, a dtype cast) are bound by memory bandwidth, not by
    cores, and OpenMP's worker threads spin-wait after every parallel region: seen with 2 cores, converting a 1B
    model spent 2.5-3 s of user CPU with one thread against 5.5-7.7 s with two, CPU the writer and CRC threads
    need. Nested uses restore what the outer one set."""
    was_enabled, threads = gc.isenabled(), torch.get_num_threads()
    gc.disable()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if was_enabled:
            gc.enable()
