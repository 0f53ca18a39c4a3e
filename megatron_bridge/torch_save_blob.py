"""One tensor's `torch.save` archive, written from the tensor's pieces in place: what PyTorch DCP stores per chunk.

torch.save needs the tensor whole and contiguous (so a fused QKV or gate+up tensor, or a view of a memory-mapped
file, is first copied into a tensor of its own) and hashes every byte with miniz's CRC-32, several times slower than
zlib's; together they cost more than reading and writing the bytes. Yet the archive is simple: a zip of stored
(uncompressed) records `archive/data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`, `data/0` (the
tensor's bytes), `version`, `.data/serialization_id`, each data area aligned to 64 bytes by an `FB` padding extra
field and followed by a data descriptor (CRC and sizes come after the data, so the data can stream), then a central
directory and zip64 end records. `TensorArchive` gives the bytes before and after the data; the caller streams the
pieces in between, CRC-ing them on the way (checkpoint_tools.crc32).

Byte for byte what torch.save writes: `archive_matches_torch()` builds a small tensor's archive both ways once per
process and callers fall back to torch.save when the installed torch writes anything else (a new record, another
alignment), or for an archive past 4 GB (zip64 fields this module does not write).
"""
from __future__ import annotations

import functools
import io
import struct
from typing import Optional

import torch

from checkpoint_tools.crc32 import crc32

_ARCHIVE = b"archive/"
_ALIGN = 64  # torch's default storage alignment (torch.utils.serialization.config.save.storage_alignment)
_LIMIT = 0xFFFFFFFF - (1 << 20)  # past this an archive needs zip64 sizes and offsets
_MASK = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t (how PyTorchStreamWriter folds record CRCs into the serialization id)."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK) + (seed >> 2)) & _MASK)) & _MASK


def _local_header(cursor: int, name: bytes) -> bytes:
    """miniz's local header with PyTorchStreamWriter's padding extra field: the data starts 64-byte aligned."""
    start = cursor + 30 + len(name) + 4
    pad = -start % _ALIGN
    extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def _descriptor(crc: int, size: int) -> bytes:
    return struct.pack("<IIII", 0x08074B50, crc, size, size)


def _record_names_and_pickle(dtype: torch.dtype, shape: tuple) -> Optional[list[tuple[bytes, Optional[bytes]]]]:
    """The records torch.save writes before `version` for a contiguous tensor (data.pkl's bytes from torch's own
    pickler; None for the storage's data), or None when this torch's internals are not the ones expected."""
    from torch import serialization

    class Records:  # stands in for PyTorchStreamWriter: keeps the small records, not the storage
        def __init__(self):
            self.records = []

        def write_record(self, name, data, nbytes):
            if isinstance(data, str):
                data = data.encode()
            self.records.append((name.encode(), data if isinstance(data, bytes) else None))

    rec = Records()
    try:  # torch.empty does not touch the memory it reserves: only its shape, dtype and size are pickled
        serialization._save(torch.empty(shape, dtype=dtype), rec, serialization.pickle, 2, False)
    except Exception:  # noqa: BLE001 - a torch whose _save differs: the caller uses torch.save
        return None
    return rec.records


class TensorArchive:
    """The bytes of `torch.save(t)` for a contiguous tensor of `dtype` and `shape`, around its data."""

    def __init__(self, dtype: torch.dtype, shape: tuple, name_hash: int, version: bytes):
        records = _record_names_and_pickle(dtype, tuple(shape))
        if records is None or [n for n, d in records if d is None] != [b"data/0"]:
            raise ValueError("torch.save's records are not the ones this writer knows")
        self.data_len = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self._name_hash, self._central, self._crcs = name_hash, [], []
        head = bytearray()
        for name, data in records:
            full = _ARCHIVE + name
            self._central.append([full, len(head), None, None])
            head += _local_header(len(head), full)
            if data is None:
                self._data_at = len(head)
                break
            self._add(data)
            head += data + _descriptor(self._central[-1][2], len(data))
        self._after = [(_ARCHIVE + n, d) for n, d in records[len(self._central):]] + [(_ARCHIVE + b"version",
                                                                                       version)]
        self.head = bytes(head)
        self.total_len = len(self.tail(0))  + len(self.head) + self.data_len

    def _add(self, data: bytes, crc: Optional[int] = None) -> None:
        crc = crc32(data) if crc is None else crc
        self._central[-1][2:] = [crc, len(data)]

    def tail(self, crc: int) -> bytes:
        """Everything after the data, given the data's CRC-32 (zlib.crc32 over the pieces in order)."""
        central = [list(c) for c in self._central]
        central[-1][2:] = [crc, self.data_len]
        pos = self._data_at + self.data_len
        out = bytearray(_descriptor(crc, self.data_len))
        pos += len(out)
        combined = 0
        for c in central:
            combined = _hash_combine(combined, c[2])
        for full, data in self._after:
            combined = _hash_combine(combined, crc32(data))
        after = self._after + [(_ARCHIVE + b".data/serialization_id",
                                b"%020d%020d" % (self._name_hash, combined))]
        for full, data in after:
            c = [full, pos, crc32(data), len(data)]
            central.append(c)
            rec = _local_header(pos, full) + data + _descriptor(c[2], len(data))
            out += rec
            pos += len(rec)
        cd_at = pos
        cd = bytearray()
        for full, offset, c_crc, size in central:
            cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, c_crc, size, size, len(full),
                              0, 0, 0, 0, 0, offset) + full
        n = len(central)
        eocd64_at = cd_at + len(cd)
        out += cd
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, len(cd), cd_at)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_at, 0)
        return bytes(out)


def _torch_save_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _constants() -> Optional[tuple[int, bytes]]:
    """(the record-name hash torch.save puts in every serialization id, the `version` record), read from a small
    torch.save archive; None when the archive has another layout."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(_torch_save_bytes(torch.zeros(2, dtype=torch.float32)))) as z:
            sid = z.read("archive/.data/serialization_id")
            version = z.read("archive/version")
        return int(sid[:20]), version
    except (KeyError, ValueError, zipfile.BadZipFile):
        return None


def archive_bytes(t: torch.Tensor) -> bytes:
    """This module's archive of a (small) contiguous tensor, whole: for the self-check and tests."""
    arch = tensor_archive(t.dtype, tuple(t.shape))
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return arch.head + data + arch.tail(crc32(data))


@functools.lru_cache(maxsize=None)
def archive_matches_torch() -> bool:
    """Whether this module writes exactly what the installed torch.save writes (checked on small tensors)."""
    if _constants() is None:
        return False
    probes = (torch.arange(6, dtype=torch.bfloat16).reshape(1, 2, 3), torch.linspace(0, 1, 37, dtype=torch.float32))
    try:
        return all(archive_bytes(t) == _torch_save_bytes(t) for t in probes)
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def tensor_archive(dtype: torch.dtype, shape: tuple) -> TensorArchive:
    name_hash, version = _constants()
    return TensorArchive(dtype, shape, name_hash, version)


def fast_archive(dtype: torch.dtype, shape: tuple) -> Optional[TensorArchive]:
    """The archive layout for a tensor of this dtype and shape, or None when torch.save must write it instead."""
    if not archive_matches_torch() or torch.Size(shape).numel() == 0:
        return None
    arch = tensor_archive(dtype, tuple(shape))
    return arch if arch.total_len < _LIMIT else None


def data_offset(blob, dtype: torch.dtype, shape: tuple) -> Optional[int]:
    """Where the data of a contiguous `dtype` `shape` tensor starts in `blob` (a torch.save archive, e.g. a slice
    of a memory-mapped .distcp file), when every other byte is what torch.save writes for such a tensor whose data
    has the CRC its descriptor records; else None (the caller loads it with torch.load). Nothing is unpickled: a
    data.pkl equal byte for byte to torch's own pickle of a plain tensor needs no vetting."""
    arch = fast_archive(dtype, tuple(shape))
    if arch is None or len(blob) != arch.total_len:
        return None
    head, end = len(arch.head), len(arch.head) + arch.data_len
    if bytes(blob[:head]) != arch.head:
        return None
    crc = struct.unpack("<I", bytes(blob[end + 4:end + 8]))[0]
    return head if bytes(blob[end:]) == arch.tail(crc) else None
