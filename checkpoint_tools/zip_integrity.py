"""Check the CRC-32 of every record in a torch zip checkpoint before its tensors are used.

`torch.save` writes a zip whose records carry CRC-32 checksums, but `torch.load(..., mmap=True)` maps tensor bytes
straight from the file and never checks them: a flipped bit in a rank file converts silently into a wrong weight.
Reading each record once and comparing its checksum turns that into an error naming the file and the record. The
cost is one sequential read of the file (the conversion's own read then comes from the page cache when the file fits
in memory) and crc32 at memory speed.
"""
from __future__ import annotations

import zipfile
import zlib

from checkpoint_tools.errors import CheckpointError

_CHUNK = 16 * 1024 * 1024


def check_zip_crc(path: str) -> None:
    """Raise CheckpointError when a record of the zip at `path` is damaged (checksum, header or length).

    A file that is not a zip at all (torch's pre-1.6 format) has no checksums to check and is left to the loader."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    # torch.save stores records uncompressed; for anything else zipfile reads and checks the CRC.
                    with z.open(info) as f:
                        while f.read(_CHUNK):
                            pass
                    continue
                _check_stored(path, raw, info)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: damaged or truncated zip ({e}); copy it again from its origin") from None


def _check_stored(path: str, raw, info: zipfile.ZipInfo) -> None:
    """CRC of one stored record, read straight from the file in large blocks (faster than zipfile's reader)."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: damaged (record {info.filename} has no local header); copy it again from "
                              f"its origin")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    crc, left = 0, info.file_size
    while left:
        block = raw.read(min(_CHUNK, left))
        if not block:
            raise CheckpointError(f"{path}: truncated inside record {info.filename}")
        crc = zlib.crc32(block, crc)
        left -= len(block)
    if crc != info.CRC:
        raise CheckpointError(f"{path}: damaged (checksum mismatch in record {info.filename}); copy it again from "
                              f"its origin")
