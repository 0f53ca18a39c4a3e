"""CRC-32, the zip checksum of every record in a torch checkpoint, at the fastest speed the machine offers.

Every rank file is checksummed twice in a conversion's life (written, then verified before use), so crc32 speed is
conversion speed: zlib's runs at about 3.4 GB/s on a core here, ISA-L's (`isal`, carry-less multiply) at about
10 GB/s. Both give the same values, take the running CRC as a second argument and release the GIL on large
buffers; ISA-L's is used when installed (a dependency of the default install), zlib's otherwise.
"""
from __future__ import annotations

try:
    from isal.isal_zlib import crc32
    IMPLEMENTATION = "isal"
except ImportError:  # an install without the wheel: the standard library's, slower
    from zlib import crc32
    IMPLEMENTATION = "zlib"

__all__ = ["crc32", "IMPLEMENTATION"]
