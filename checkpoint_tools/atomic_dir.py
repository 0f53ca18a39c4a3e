"""Write a checkpoint directory so that a crash never leaves something that looks complete.

Everything goes into a hidden sibling directory that is renamed onto the destination only after the writer
returned; an existing destination is refused unless `force` is given.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


class DestinationExistsError(FileExistsError):
    pass


def check_destination(dst: str, force: bool) -> None:
    if os.path.exists(dst) and not force:
        raise DestinationExistsError(f"destination {dst} exists; pass --force to replace it")


@contextlib.contextmanager
def atomic_directory(dst: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to `dst`; on success it becomes `dst`, on failure it is removed."""
    dst = os.path.abspath(dst)
    check_destination(dst, force)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        # Move the old one aside first so there is never a moment with neither a complete old nor new copy.
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    os.chmod(dst, 0o755)
