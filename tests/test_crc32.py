"""The zip checksum used for rank files is CRC-32 exactly as zlib (and torch's miniz) compute it, chained or not."""
import os
import zlib

import pytest

from checkpoint_tools import crc32 as crc


@pytest.mark.parametrize("size", [0, 1, 15, 16, 4095, 1 << 20, (1 << 20) + 7])
def test_same_values_as_zlib_whole_and_chained(size):
    data = os.urandom(size)
    assert crc.crc32(data) == zlib.crc32(data)
    cut = size // 3
    assert crc.crc32(memoryview(data)[cut:], crc.crc32(data[:cut])) == zlib.crc32(data)


def test_the_default_install_has_the_fast_one():
    """`isal` is in install_requires: an install without it still works (zlib), but converts slower."""
    assert crc.IMPLEMENTATION == "isal"
