"""Write a checkpoint directory so that a crash never leaves something that looks complete, and no litter.

- Everything goes into a hidden sibling `.<name>.partial-<pid>-<random>@<host>`; its files and folders are fsynced,
  then it is renamed onto the destination, then the parent folder is fsynced: a power loss leaves either no
  destination or a whole one, never one with empty files.
- Replacing (`force`) swaps old and new in one step (Linux `renameat2(RENAME_EXCHANGE)`), so the destination is a
  whole checkpoint at every moment. Where the file system cannot swap, the old one is moved into
  `.<name>.old-<pid>-<random>@<host>/old` first; a crash between the two renames leaves it there, and the next run
  for that destination puts it back.
- The owner's pid and host are in every sibling's name, so the next run writing the same destination removes what a
  killed run (SIGKILL, power loss) left, logs it, and refuses, naming the folder, while the owner is still alive.
- A destination that is, holds or lies inside a source is refused, `force` or not: replacing it would delete the
  source.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Iterable, Iterator, Optional

from checkpoint_tools.interrupts import interrupts_deferred

log = logging.getLogger(__name__)

KINDS = ("partial", "old", "scratch")
OLD_ENTRY = "old"  # the replaced destination inside an `.old-*` holder
# `<kind>-<pid>-<random>@<host>` after `.<name>.`; older runs wrote `<kind>-<random>` (owner unknown).
_TAIL = re.compile(r"^(?P<kind>partial|old|scratch)-(?:(?P<pid>\d+)-[A-Za-z0-9_]+@(?P<host>.+)|[A-Za-z0-9_]+)$")


class DestinationExistsError(FileExistsError):
    pass


class DestinationError(ValueError):
    """The destination cannot be written as asked (overlaps a source, parent is a file, another run writes it)."""


# ---- fsync: data before the names that point at it, so a power loss cannot leave whole-looking empty files ----

def fsync_path(path: str) -> None:
    """Flush one file's data, or one folder's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file, then every folder bottom-up, so no entry names data that is not on disk yet.

    One walk covers every writer (safetensors, torch.save, json, copied tokenizer files, and the files megatron-core's
    dist_checkpointing writes in torchrun workers) without each having to remember it."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(folder)


# ---- sibling folders: named by owner so a later run can tell litter from a live writer ----

def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def make_sibling(dst: str, kind: str) -> str:
    """Create `.<name>.<kind>-<pid>-<random>@<host>` next to `dst` (same file system, so the final rename is
    atomic and the space is used where the user said)."""
    assert kind in KINDS, kind
    parent, base = os.path.split(os.path.abspath(dst))
    return tempfile.mkdtemp(prefix=f".{base}.{kind}-{os.getpid()}-", suffix=f"@{_host()}", dir=parent)


def _process_start(pid: int) -> Optional[float]:
    """Start time of `pid` in seconds since the epoch (Linux /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, folder: str) -> bool:
    """Whether process `pid` on this host may still own `folder`. A process that started after the folder was last
    changed is a reuse of the pid, not the owner."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # exited, waiting to be reaped
    except OSError:
        pass
    return started is None or started <= os.stat(folder).st_mtime + 1.0


def _delete(path: str) -> None:
    """Remove a folder tree, or a file or symlink (what a replaced destination may have been); never follow links."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _remove(path: str, why: str) -> None:
    _delete(path)
    if os.path.lexists(path):
        raise DestinationError(f"{path}: {why}, and it could not be removed; delete it by hand and retry")
    log.warning("removed %s (%s)", path, why)


def recover_leftovers(dst: str) -> list[str]:
    """Clean up what killed runs left next to `dst`; returns one line per action (also logged).

    A dead owner's `.partial-*` / `.scratch-*` is removed; its `.old-*` is put back as `dst` when `dst` is missing
    (the crash came between the two renames of a replacement), else removed. A live owner's folder, or one from
    another host, is named in a `DestinationError` (another conversion to the same destination is running, or its
    host is gone): the fix is to wait for it or delete the folder."""
    parent, base = os.path.split(os.path.abspath(dst))
    if not os.path.isdir(parent):
        return []
    done = []
    lead = f".{base}."
    for name in sorted(os.listdir(parent)):
        m = _TAIL.match(name[len(lead):]) if name.startswith(lead) else None
        if m is None:
            continue
        path = os.path.join(parent, name)
        kind, pid, host = m["kind"], m["pid"], m["host"]
        if pid is None:
            raise DestinationError(f"{path} is left from an interrupted write of {dst} (owner unknown); "
                                   f"if no conversion to {dst} is running, delete it and retry")
        if host != _host() or _owner_alive(int(pid), path):
            if host == _host() and int(pid) == os.getpid():
                continue  # ours: a scratch folder of this very conversion
            raise DestinationError(f"{path} is being written by pid {pid} on {host}: another conversion to {dst} "
                                   f"is running; wait for it, or if that run is over, delete the folder and retry")
        held = os.path.join(path, OLD_ENTRY)
        if kind == "old" and os.path.isdir(held) and not os.path.lexists(dst):
            os.rename(held, dst)
            fsync_path(parent)
            done.append(f"restored {dst} from {path} (a replacement was killed between its two renames)")
            log.warning("%s", done[-1])
            _remove(path, "emptied holder of the restored destination")
            continue
        why = f"left by pid {pid}, which stopped before it finished"
        _remove(path, why)
        done.append(f"removed {path} ({why})")
    return done


# ---- the destination ----

def _realpath_ancestors(path: str) -> Iterator[str]:
    """`path` and each folder above it that exists (symlinks resolved)."""
    path = os.path.realpath(path)
    while True:
        if os.path.exists(path):
            yield path
        up = os.path.dirname(path)
        if up == path:
            return
        path = up


def _is_within(inner: str, outer: str) -> bool:
    """`inner` equals or lies inside `outer`, by resolved path or by file identity (bind mounts, hard-linked
    folders seen through another name)."""
    if not os.path.exists(outer):
        return False
    outer_real = os.path.realpath(outer)
    for anc in _realpath_ancestors(inner):
        if anc == outer_real or os.path.samefile(anc, outer_real):
            return True
    return False


def check_overlap(dst: str, sources: Iterable[Optional[str]]) -> None:
    """Refuse a destination that is a source, holds one, or lies inside one: writing it would delete the source
    (with --force) or bury the output in it."""
    for src in sources:
        if not src:
            continue
        if _is_within(dst, src):
            how = "is" if os.path.realpath(dst) == os.path.realpath(src) else "lies inside"
            raise DestinationError(f"destination {dst} {how} the source {src}; choose a folder outside the source")
        if os.path.lexists(dst) and _is_within(src, dst):
            raise DestinationError(f"destination {dst} contains the source {src}; replacing it would delete the "
                                   f"source; choose another folder")


def check_parent(dst: str) -> None:
    """Refuse a destination under a file with a plain message instead of 'Not a directory'."""
    up = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise DestinationError(f"cannot create {dst}: {up} is a file, not a folder; choose a destination in a folder")


def check_paths(dst: str, sources: Iterable[Optional[str]] = ()) -> None:
    """The checks that change nothing on disk (for --dry-run too): parent not a file, no overlap with a source."""
    check_parent(dst)
    check_overlap(dst, sources)


def check_destination(dst: str, force: bool, sources: Iterable[Optional[str]] = ()) -> None:
    """Everything that can be said about `dst` before work starts; also cleans up what killed runs left."""
    check_paths(dst, sources)
    recover_leftovers(dst)
    if os.path.lexists(dst) and not force:
        raise DestinationExistsError(f"destination {dst} exists; pass --force to replace it")


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no swap here: use the two-rename path
        return False
    raise OSError(err, os.strerror(err), b)


def _install(tmp: str, dst: str) -> Optional[str]:
    """Put the complete `tmp` at `dst` without a moment where a crash loses both old and new. Returns the folder
    that now holds the replaced destination (for the caller to remove), or None."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        replaced = None
    elif _exchange(tmp, dst):
        replaced = tmp  # now holds the old destination; if killed before removal, the next run removes it
    else:
        replaced = make_sibling(dst, "old")
        os.rename(dst, os.path.join(replaced, OLD_ENTRY))
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(os.path.join(replaced, OLD_ENTRY), dst)
            os.rmdir(replaced)
            raise
    fsync_path(os.path.dirname(dst))
    return replaced


@contextlib.contextmanager
def atomic_directory(dst: str, force: bool = False, sources: Iterable[Optional[str]] = ()) -> Iterator[str]:
    """Yield a temporary directory next to `dst`; on success it becomes `dst` (durably), on any failure or
    interrupt it is removed."""
    dst = os.path.abspath(dst)
    check_destination(dst, force, sources)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = make_sibling(dst, "partial")
    litter = tmp
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared checkpoint private
        fsync_tree(tmp)
        with interrupts_deferred():  # a signal lands before or after the renames, never between
            litter = _install(tmp, dst)
    finally:
        if litter:
            _delete(litter)


@contextlib.contextmanager
def scratch_directory(dst: str) -> Iterator[str]:
    """A scratch folder beside `dst` (same file system, so the space is where the user said it would be), removed
    on exit; a killed run's scratch folder is removed by the next run for `dst`."""
    dst = os.path.abspath(dst)
    check_parent(dst)
    recover_leftovers(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = make_sibling(dst, "scratch")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DestinationError", "DestinationExistsError", "atomic_directory", "check_destination", "check_overlap",
           "check_paths", "fsync_path", "fsync_tree", "recover_leftovers", "scratch_directory"]
