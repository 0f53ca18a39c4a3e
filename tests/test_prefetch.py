"""The start-up prefetch: it reads what the conversion will read (and nothing else) into the page cache, within its
budget. Residency is read back from the kernel (mincore) after evicting the files' pages (fadvise DONTNEED)."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time

from checkpoint_tools.prefetch import start_prefetch, source_files

PAGE = os.sysconf("SC_PAGE_SIZE")


def evict(path: str) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: str) -> int:
    """Bytes of `path` in the page cache, as mincore(2) reports them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable view for ctypes, never written
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
            count = sum(b & 1 for b in vec)
            del addr
        finally:
            try:
                m.close()
            except BufferError:
                pass
    return min(count * PAGE, size)


def write(path: str, nbytes: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
    return path


def test_source_files_are_the_weights_of_the_tracked_iteration(tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000200" / "mp_rank_00").mkdir(parents=True)
    (legacy / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    for it in ("iter_0000100", "iter_0000200"):
        write(str(legacy / it / "mp_rank_00" / "model_optim_rng.pt"), 100)
        write(str(legacy / it / "mp_rank_01" / "model_optim_rng.pt"), 100)
    (legacy / "latest_checkpointed_iteration.txt").write_text("200")
    assert source_files(str(legacy)) == [str(legacy / "iter_0000200" / f"mp_rank_0{r}" / "model_optim_rng.pt")
                                         for r in (0, 1)]
    hf = tmp_path / "hf"
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "config.json",
                 "tokenizer.json"):
        write(str(hf / name), 10)
    assert [os.path.basename(p) for p in source_files(str(hf))] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (legacy / "latest_checkpointed_iteration.txt").write_text("garbage")  # the conversion reports it, not this
    assert source_files(str(legacy)) == [] and source_files(str(tmp_path / "absent")) == []


def test_prefetch_populates_the_page_cache_within_its_budget(tmp_path):
    mb = 1024 * 1024
    a = write(str(tmp_path / "hf" / "model-00001-of-00002.safetensors"), 96 * mb)
    b = write(str(tmp_path / "hf" / "model-00002-of-00002.safetensors"), 96 * mb)
    for p in (a, b):
        evict(p)
    assert resident_bytes(a) + resident_bytes(b) < 24 * mb, "eviction did not take: the test could not tell"
    job = start_prefetch(str(tmp_path / "hf"), budget=96 * mb + 16 * mb)
    job.join(timeout=60)
    assert job.done == 112 * mb
    assert resident_bytes(a) == 96 * mb
    # The budget stopped it 16 MB into b; the kernel's own readahead may add its window (8 MB here) or two.
    assert 16 * mb <= resident_bytes(b) <= 48 * mb


def _rank_file(path: str) -> str:
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"w": torch.arange(100_000, dtype=torch.float32)}, path)
    return path


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def test_early_crc_check_is_collected_once_and_never_stale(tmp_path):
    """A damaged rank file found by the early check fails where the conversion collects it; a file changed after
    its early check is checked again (the early result is for the bytes it read, not for the path)."""
    import pytest
    from checkpoint_tools import zip_integrity
    from checkpoint_tools.errors import CheckpointError

    good = _rank_file(str(tmp_path / "a" / "model_optim_rng.pt"))
    bad = _rank_file(str(tmp_path / "b" / "model_optim_rng.pt"))
    _flip(bad, os.path.getsize(bad) // 2)
    zip_integrity.check_early([good, bad])
    zip_integrity.check_zip_crc(good)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zip_integrity.check_zip_crc(bad)
    zip_integrity.check_early([good])
    zip_integrity._early[os.path.abspath(good)][1].result()  # the early check passed on the old bytes
    time.sleep(0.05)  # file times tick with the kernel's clock (a few ms): let the change show in mtime
    _flip(good, os.path.getsize(good) // 2)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zip_integrity.check_zip_crc(good)
    assert zip_integrity._early == {}
