"""Read a checkpoint's files into the page cache in the background while the converter is still starting.

A conversion spends its first seconds importing torch (about 2.5 s of CPU on a small machine), one core busy and
the disk idle; from a cold cache it then waits on the disk. Starting the reads before the import overlaps the two:
`start_prefetch(src)` returns at once, and a daemon thread asks the kernel to populate the source's pages
(`madvise(MADV_POPULATE_READ)` on a shared read-only mapping: the kernel reads, nothing is copied to user space, so
the thread costs almost no CPU; a plain read loop where the kernel lacks it, Linux < 5.14).

Megatron rank files are read by their CRC check, started here too (see `start_prefetch`).

Only what the conversion will read is prefetched, in the order it reads it: the weight files of a Hugging Face
folder, or the one iteration folder a Megatron tracker names (a training folder may hold many). The total is capped
at half of the memory the kernel says is available, so a model larger than the page cache never evicts its own
first pages. This module imports nothing heavy: it runs before torch is loaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Optional

from checkpoint_tools import zip_integrity

TRACKER = "latest_checkpointed_iteration.txt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".distcp")
STEP = 64 * 1024 * 1024
MADV_POPULATE_READ = 22  # Linux 5.14+
PROT_READ, MAP_SHARED = 0x1, 0x01


def source_files(src: str) -> list[str]:
    """The files a conversion of `src` reads, in reading order (weights of the chosen iteration only)."""
    root = src
    tracker = os.path.join(src, TRACKER)
    if os.path.isfile(tracker):
        try:
            with open(tracker) as f:
                text = f.read().strip()
        except OSError:
            return []
        name = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if name is None:
            return []
        root = os.path.join(src, name)
        found = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    elif os.path.isdir(src):
        found = [os.path.join(src, f) for f in os.listdir(src)]
    else:
        return []
    return sorted(p for p in found if p.endswith(WEIGHT_SUFFIXES) and os.path.isfile(p))


def available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class _Populate:
    """Page-cache population of a file range without copying it to user space (ctypes releases the GIL)."""

    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.mmap, self.madvise, self.munmap = libc.mmap, libc.madvise, libc.munmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def file(self, path: str, limit: int, stop: threading.Event) -> int:
        """Populate up to `limit` bytes of `path`, one STEP-sized mapping at a time (so the process never maps
        more than STEP of it); returns the bytes done. Raises OSError when the kernel cannot."""
        size = min(os.path.getsize(path), limit)
        done = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < size and not stop.is_set():
                n = min(STEP, size - done)
                addr = self.mmap(None, n, PROT_READ, MAP_SHARED, fd, done)
                if addr in (None, ctypes.c_void_p(-1).value):
                    raise OSError(ctypes.get_errno(), "mmap failed")
                try:
                    if self.madvise(addr, n, MADV_POPULATE_READ) != 0:
                        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ) failed")
                finally:
                    self.munmap(addr, n)
                done += n
        finally:
            os.close(fd)
        return done


def _read_file(path: str, limit: int, stop: threading.Event) -> int:
    """The portable way: read through a reusable buffer (copies to user space, so it costs CPU)."""
    buf = bytearray(STEP)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < limit and not stop.is_set():
            n = f.readinto(buf)
            if not n:
                break
            done += n
    return done


class Prefetch:
    """A running prefetch; `stop()` ends it early (it is a daemon thread: it never delays the exit either)."""

    def __init__(self, files: list[str], budget: int):
        self.files, self.budget = files, budget
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            populate = _Populate()
        except (OSError, AttributeError):
            populate = None
        for path in self.files:
            left = self.budget - self.done
            if left <= 0 or self._stop.is_set():
                return
            try:
                if populate is not None:
                    try:
                        self.done += populate.file(path, left, self._stop)
                        continue
                    except OSError:
                        populate = None  # an old kernel: read the rest the portable way
                self.done += _read_file(path, left, self._stop)
            except OSError:
                continue  # a file the conversion will report on its own; prefetching is only a hint

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)


def start_prefetch(src: str, budget: Optional[int] = None) -> Optional[Prefetch]:
    """Start prefetching the files a conversion of `src` reads; None when there is nothing to read.

    Megatron rank files (torch zips) are read by their CRC check instead, started here
    (zip_integrity.check_early): the conversion checks every one of them before use anyway, and now that reading
    is what overlaps the import."""
    files = source_files(src)
    if os.path.isfile(os.path.join(src, TRACKER)):
        ranks = [p for p in files if p.endswith(".pt")]
        zip_integrity.check_early(ranks)
        files = [p for p in files if p not in set(ranks)]
    if not files:
        return None
    if budget is None:
        avail = available_memory()
        budget = avail // 2 if avail else 0
    if budget <= 0:
        return None
    return Prefetch(files, budget)
