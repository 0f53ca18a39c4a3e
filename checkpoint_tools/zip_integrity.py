"""Check the CRC-32 of every record in a torch zip checkpoint before its tensors are used.

`torch.save` writes a zip whose records carry CRC-32 checksums, but `torch.load(..., mmap=True)` maps tensor bytes
straight from the file and never checks them: a flipped bit in a rank file converts silently into a wrong weight.
Reading each record once and comparing its checksum turns that into an error naming the file and the record. The
records are summed through a memory map (no copy into user space; the conversion's own reads then come from the
page cache when the file fits in memory), crc32 at memory speed with the GIL released (checkpoint_tools.crc32).

A command can start the checks before it has imported torch (`check_early`, from checkpoint_tools.prefetch):
the reading then overlaps the import, and `check_zip_crc` of the same unchanged file later takes that result instead
of reading the file again.
"""
from __future__ import annotations

import mmap
import os
import threading
import zipfile
from concurrent.futures import Future
from typing import Iterable

from checkpoint_tools.crc32 import crc32
from checkpoint_tools.errors import CheckpointError

_CHUNK = 64 * 1024 * 1024

# path -> (the file's identity when the check started, its result); each is taken at most once.
_early: dict[str, tuple[tuple, Future]] = {}
_early_lock = threading.Lock()


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_early(paths: Iterable[str]) -> None:
    """Start checking `paths` in background threads (up to one per core); `check_zip_crc` collects the results.
    The threads are daemons: a command that fails before it needs the results exits without waiting for them."""
    slots = threading.BoundedSemaphore(min(os.cpu_count() or 1, 8))

    def run(path: str, result: Future) -> None:
        with slots:
            try:
                _check(path)
            except BaseException as e:  # noqa: BLE001 - handed to whoever collects it
                result.set_exception(e)
            else:
                result.set_result(None)

    for p in paths:
        try:
            ident = _identity(p)
        except OSError:
            continue
        result: Future = Future()
        with _early_lock:
            _early[os.path.abspath(p)] = (ident, result)
        threading.Thread(target=run, args=(p, result), name="crc-early", daemon=True).start()


def check_zip_crc(path: str) -> None:
    """Raise CheckpointError when a record of the zip at `path` is damaged (checksum, header or length).

    A file that is not a zip at all (torch's pre-1.6 format) has no checksums to check and is left to the loader."""
    with _early_lock:
        early = _early.pop(os.path.abspath(path), None)
    if early is not None:
        ident, result = early
        try:
            same = _identity(path) == ident
        except OSError:
            same = False
        if same:
            result.result()  # raises what the early check found
            try:
                if _identity(path) == ident:  # unchanged while it was being checked
                    return
            except OSError:
                pass
    _check(path)


def _check(path: str) -> None:
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as view:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        # torch.save stores records uncompressed; for anything else zipfile reads and checks the CRC.
                        with z.open(info) as f:
                            while f.read(_CHUNK):
                                pass
                        continue
                    _check_stored(path, view, info)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: damaged or truncated zip ({e}); copy it again from its origin") from None


def _check_stored(path: str, view: mmap.mmap, info: zipfile.ZipInfo) -> None:
    """CRC of one stored record, summed straight from the file's memory map in large blocks."""
    header = view[info.header_offset:info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: damaged (record {info.filename} has no local header); copy it again from "
                              f"its origin")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(view):
        raise CheckpointError(f"{path}: truncated inside record {info.filename}")
    crc = 0
    with memoryview(view) as data:
        for i in range(start, start + info.file_size, _CHUNK):
            crc = crc32(data[i:min(i + _CHUNK, start + info.file_size)], crc)
    if crc != info.CRC:
        raise CheckpointError(f"{path}: damaged (checksum mismatch in record {info.filename}); copy it again from "
                              f"its origin")
