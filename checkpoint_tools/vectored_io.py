"""Tensor bytes to a file without building the tensor: memory views of tensors, a column-block tensor as row
segments, and vectored writes that finish what the kernel left (both checkpoint writers stream this way)."""
from __future__ import annotations

import ctypes
import os

IOV_MAX = 1024  # buffers per writev() call (Linux's UIO_MAXIOV)


def memory(t, nbytes: int) -> memoryview:
    """`nbytes` bytes from the start of CPU tensor `t`, without a copy (the caller keeps `t` alive meanwhile)."""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def row_segments(blocks: list) -> list[memoryview]:
    """The bytes of `torch.cat(blocks, dim=1)` in order, one memoryview per block row (no copy); each block is 2-D
    with contiguous rows (a column slice's are), all with the same row count."""
    spans = []
    for b in blocks:
        es, (rows, cols), step = b.element_size(), b.shape, b.stride(0)
        span = ((rows - 1) * step + cols) * es if b.numel() else 0
        spans.append((memory(b, span) if span else None, step * es, cols * es))
    views = []
    for i in range(blocks[0].shape[0]):
        for base, step, width in spans:
            if width:
                views.append(base[i * step:i * step + width])
    return views


def write_all(fd: int, view: memoryview, chunk: int = 1 << 30) -> None:
    """os.write until every byte is written, at most `chunk` bytes a call."""
    done, n = 0, len(view)
    while done < n:
        done += os.write(fd, view[done:done + chunk])


def writev_all(fd: int, views: list) -> None:
    """`views` in order, IOV_MAX per writev() call; a short write (rare on a regular file, e.g. near a full disk) is
    finished piece by piece."""
    for i in range(0, len(views), IOV_MAX):
        batch = views[i:i + IOV_MAX]
        done = os.writev(fd, batch)
        for view in batch:
            if done >= len(view):
                done -= len(view)
                continue
            write_all(fd, memoryview(view)[done:])
            done = 0
