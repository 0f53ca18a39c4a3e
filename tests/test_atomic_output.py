"""A stopped or killed conversion leaves nothing that looks whole and no litter; --force deletes the destination and
nothing else.

The signal tests send real signals to a real `python -m launch convert`. To catch it mid-way every time, its stderr
is a pipe that is already full: the first progress bar, drawn right after the partial folder is made, blocks the
child there until the test reads the pipe (a stalled log pipe, as on a busy cluster; no hook in the product).
"""
from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_llama
from checkpoint_tools import atomic_dir
from checkpoint_tools.atomic_dir import DestinationError, atomic_directory, check_destination, recover_leftovers
from checkpoint_tools.interrupts import Terminated, interrupts_deferred, termination_as_exception
from launch.cli import main
from megatron_bridge import legacy_format
from megatron_bridge.convert import ConvertOptions, hf_to_megatron

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _siblings(dst: str) -> list[str]:
    """What a write of `dst` may leave beside it: `.<name>.partial-*`, `.old-*`, `.scratch-*`."""
    parent, base = os.path.split(dst)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


def _tree_hashes(root: str) -> dict:
    """Every file and symlink under `root` -> its content hash or link target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _full_pipe() -> tuple[int, int, int]:
    """(read end, write end, bytes already in it): a pipe whose next write blocks."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)  # the flag is shared with the child: its writes must block, not fail
    return r, w, filled


def _drain(r: int, filled: int, timeout: float = 180) -> str:
    """Read the pipe to EOF (the child exited); return what the child wrote after the filler."""
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([r], [], [], 1.0)
        if ready:
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    os.close(r)
    return b"".join(chunks)[filled:].decode(errors="replace")


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the conversion exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt. A suite
    started in the background of a script (`pytest &`) inherits SIGINT ignored, and the CLI rightly keeps a signal
    its parent ignored ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_stuck(src: str, dst: str, *extra: str) -> tuple[subprocess.Popen, int, int]:
    """Start a conversion and return once it is held inside its partial folder."""
    r, w, filled = _full_pipe()
    proc = subprocess.Popen([sys.executable, "-m", "launch", "convert", src, dst, *extra], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=w, preexec_fn=_interruptible)
    os.close(w)
    _wait_for(lambda: any(".partial-" in n for n in _siblings(dst)), proc, "the partial folder to appear")
    return proc, r, filled


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def src(tmp_path):
    return make_llama(str(tmp_path / "models" / "hf"))


# ---- signals sent to a real conversion ----

@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 143, "error: stopped by SIGTERM; partial output removed"),
    (signal.SIGINT, 130, "error: interrupted (Ctrl-C); partial output removed"),
])
def test_signal_mid_conversion_removes_partial_output(tmp_path, src, sig, code, message):
    dst = str(tmp_path / "out")
    proc, r, filled = _start_stuck(src, dst, "--tp", "2")
    os.kill(proc.pid, sig)
    err = _drain(r, filled)
    assert proc.wait(timeout=60) == code, err
    # One line, last (after the progress bar the signal cut short, which ends without a newline).
    assert err.rstrip().endswith(message) and err.count("error:") == 1, err
    assert "Traceback" not in err
    assert not os.path.exists(dst) and _siblings(dst) == []


def test_sigkill_leftover_is_named_while_owner_lives_then_removed_by_next_run(tmp_path, src):
    dst = str(tmp_path / "out")
    proc, r, filled = _start_stuck(src, dst, "--tp", "2")
    try:
        (partial,) = _siblings(dst)
        # Another run while the first is alive: its folder is left alone and named.
        with pytest.raises(DestinationError, match=rf"{partial} is being written by pid {proc.pid}"):
            check_destination(dst, force=False)
        assert _siblings(dst) == [partial]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        os.close(r)
    assert _siblings(dst) == [partial] and not os.path.exists(dst)  # SIGKILL: no cleanup possible

    again = _run_cli("convert", src, dst, "--tp", "2", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"removed {os.path.join(str(tmp_path), partial)} (left by pid {proc.pid}" in again.stderr
    assert _siblings(dst) == []
    assert legacy_format.open_legacy(dst).tp == 2


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _is_worker(pid: int) -> bool:
    try:
        cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        return False
    return "megatron_bridge.mcore_worker" in cmd and "torch.distributed.run" not in cmd


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _verify_cli(src: str, tmp_path, **popen) -> subprocess.Popen:
    """`verify` runs megatron-core under torchrun (conversion no longer does: torch_dist is streamed in-process)."""
    megatron = str(tmp_path / "megatron")
    hf_to_megatron(src, megatron, ConvertOptions(tp=2, progress=False))
    return subprocess.Popen([sys.executable, "-m", "launch", "verify", src, megatron, "--no-round-trip",
                             "--no-progress"], env=ENV, cwd=ROOT, **popen)


def test_sigterm_stops_torchrun_workers(tmp_path, src):
    """SIGTERM to the CLI must stop torchrun's workers (they run in their own sessions) before it exits, or they
    would go on writing (results, or checkpoints in a folder about to be removed)."""
    proc = _verify_cli(src, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def workers():  # CLI -> torchrun -> megatron-core workers: wait until a worker runs
        tree = _descendants(proc.pid)
        return tree if any(_is_worker(p) for p in tree) else None

    tree = _wait_for(workers, proc, "torchrun's workers to start")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "error: stopped by SIGTERM" in err and err.count("error:") == 1, err
    # Checked at once: the CLI must have waited for torchrun, and torchrun for its workers, before exiting.
    orphans = [p for p in tree if _running(p)]
    for p in orphans:  # don't let a failure leak processes into the rest of the suite
        os.kill(p, signal.SIGKILL)
    assert orphans == []


def test_sigkill_during_torchrun_stops_the_workers(tmp_path, src):
    """SIGKILL allows no cleanup, but torchrun (in its own session) is told of its parent's death and stops its
    workers."""
    proc = _verify_cli(src, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = _wait_for(lambda: (lambda t: t if any(_is_worker(p) for p in t) else None)(_descendants(proc.pid)),
                     proc, "torchrun's workers to start")
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.time() + 20  # torchrun stops its workers, then exits (its own shutdown)
    while any(_running(p) for p in tree) and time.time() < deadline:
        time.sleep(0.1)
    orphans = [p for p in tree if _running(p)]
    for p in orphans:
        os.kill(p, signal.SIGKILL)
    assert orphans == []


# ---- --force deletes the destination and nothing else ----

@pytest.mark.parametrize("case", ["parent of source", "source itself", "inside source", "symlink to source",
                                  "symlink to parent of source", "source itself, no --force"])
def test_destination_overlapping_source_refused(tmp_path, src, case, capsys):
    models = os.path.dirname(src)
    open(os.path.join(models, "neighbour.txt"), "w").write("keep me\n")
    dst, force, expect = {
        "parent of source": (models, True, "contains the source"),
        "source itself": (src, True, "is the source"),
        "inside source": (os.path.join(src, "out"), True, "lies inside the source"),
        "symlink to source": (str(tmp_path / "link"), True, "is the source"),
        "symlink to parent of source": (str(tmp_path / "link"), True, "contains the source"),
        "source itself, no --force": (src, False, "is the source"),
    }[case]
    if case.startswith("symlink"):
        os.symlink(src if case == "symlink to source" else models, dst)
    before = _tree_hashes(str(tmp_path))
    assert main(["convert", src, dst, "--tp", "2", *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: destination ") and expect in err and "\n" not in err, err
    assert _tree_hashes(str(tmp_path)) == before


def test_tokenizer_folder_inside_destination_refused(tmp_path, src, capsys):
    tok = str(tmp_path / "out" / "tok")
    os.makedirs(tok)
    assert main(["convert", src, str(tmp_path / "out"), "--tokenizer", tok, "--force"]) == 2
    assert f"contains the source {tok}" in capsys.readouterr().err
    assert os.path.isdir(tok)


@pytest.mark.parametrize("sub", ["out", "deeper/out"])
def test_destination_under_a_file_gets_a_plain_message(tmp_path, src, sub, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n")
    assert main(["convert", src, str(blocker / sub)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot create {blocker / sub}: {blocker} is a file, not a folder; choose a destination " \
                  f"in a folder", err
    assert blocker.read_text() == "a file\n"


# ---- a replacement killed between its two renames, and what the next run does ----

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leave_old_holder(dst: str, old_contents: str) -> tuple[str, int]:
    """The state a crash between `dst -> holder/old` and `new -> dst` leaves (two-rename path): (holder, pid)."""
    parent, base = os.path.split(dst)
    pid = _dead_pid()
    holder = os.path.join(parent, f".{base}.old-{pid}-abc123@{socket.gethostname()}")
    os.makedirs(holder)
    shutil.copytree(old_contents, os.path.join(holder, atomic_dir.OLD_ENTRY))
    return holder, pid


def test_replacement_killed_between_renames_is_restored_by_next_run(tmp_path, src, capsys, caplog):
    old = str(tmp_path / "old_ckpt")
    hf_to_megatron(src, old, ConvertOptions(tp=2, progress=False))
    want = _tree_hashes(old)
    dst = str(tmp_path / "out")
    holder, _ = _leave_old_holder(dst, old)

    assert main(["convert", src, dst, "--tp", "1", "--no-progress"]) == 2  # no --force: the restored one is kept
    assert capsys.readouterr().err.strip() == f"error: destination {dst} exists; pass --force to replace it"
    assert f"restored {dst} from {holder}" in caplog.text
    assert _tree_hashes(dst) == want and _siblings(dst) == []

    assert main(["convert", src, dst, "--tp", "1", "--force", "--no-progress"]) == 0
    assert legacy_format.open_legacy(dst).tp == 1 and _siblings(dst) == []


def test_old_holder_beside_a_complete_destination_is_removed(tmp_path, src):
    dst = str(tmp_path / "out")
    hf_to_megatron(src, dst, ConvertOptions(tp=2, progress=False))
    want = _tree_hashes(dst)
    holder, pid = _leave_old_holder(dst, src)
    assert recover_leftovers(dst) == [f"removed {holder} (left by pid {pid}, which stopped before it finished)"]
    assert _tree_hashes(dst) == want and _siblings(dst) == []


def test_unknown_owner_and_other_host_are_named_not_removed(tmp_path):
    dst = str(tmp_path / "out")
    legacy = tmp_path / ".out.partial-k2j4h1"  # written before owners were recorded
    legacy.mkdir()
    with pytest.raises(DestinationError, match=r"\.out\.partial-k2j4h1 is left from an interrupted write"):
        check_destination(dst, force=False)
    legacy.rmdir()
    remote = tmp_path / f".out.scratch-{_dead_pid()}-abc@other-node-17"
    remote.mkdir()
    with pytest.raises(DestinationError, match=r"on other-node-17: another conversion"):
        check_destination(dst, force=False)
    assert remote.is_dir()


@pytest.mark.parametrize("can_exchange", [True, False])
def test_force_replacement_leaves_new_and_no_litter(tmp_path, monkeypatch, can_exchange):
    """Both replacement paths: the atomic swap and the two renames through `.old-*` (file systems without swap)."""
    swaps = []
    real = atomic_dir._exchange
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: swaps.append(can_exchange and real(a, b)) or swaps[-1])
    dst = str(tmp_path / "out")
    for text in ("old", "new"):
        with atomic_directory(dst, force=True) as tmp:
            open(os.path.join(tmp, "f.txt"), "w").write(text)
    assert swaps == [can_exchange]  # this file system swaps; the other path is taken only when told it cannot
    assert open(os.path.join(dst, "f.txt")).read() == "new" and _siblings(dst) == []
    assert oct(os.stat(dst).st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("can_exchange", [True, False])
@pytest.mark.parametrize("kind", ["file", "symlink to a folder"])
def test_force_replaces_a_file_or_link_itself_not_what_it_points_to(tmp_path, monkeypatch, kind, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep\n")
    dst = str(tmp_path / "out")
    if kind == "file":
        open(dst, "w").write("a file\n")
    else:
        os.symlink(elsewhere, dst)
    with atomic_directory(dst, force=True) as tmp:
        open(os.path.join(tmp, "f.txt"), "w").write("new")
    assert not os.path.islink(dst) and open(os.path.join(dst, "f.txt")).read() == "new"
    assert (elsewhere / "keep.txt").read_text() == "keep\n" and _siblings(dst) == []


def test_scratch_directory_is_removed_even_on_error(tmp_path):
    dst = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_dir.scratch_directory(dst) as tmp:
            assert os.path.basename(tmp).startswith(f".out.scratch-{os.getpid()}-")
            open(os.path.join(tmp, "x"), "w").write("x")
            raise RuntimeError("boom")
    assert _siblings(dst) == []


# ---- durability: what a power-loss test cannot check ----

def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_parent_after(tmp_path, src, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b, *args, **kw):
        events.append(("rename", os.path.abspath(a), os.path.abspath(b)))
        return real_rename(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    dst = os.path.realpath(str(tmp_path)) + "/out"
    hf_to_megatron(src, dst, ConvertOptions(tp=2, pp=2, progress=False))

    (i, tmp), = [(i, e[1]) for i, e in enumerate(events) if e[0] == "rename" and e[2] == dst]
    synced_before = {os.path.relpath(e[1], tmp) for e in events[:i] if e[0] == "fsync" and e[1].startswith(tmp)}
    written = {os.path.relpath(os.path.join(folder, n), dst)
               for folder, dirs, files in os.walk(dst) for n in dirs + files} | {"."}
    assert len(written) > 10 and written <= synced_before, written - synced_before
    assert ("fsync", os.path.dirname(dst)) in events[i + 1:]


def test_sigterm_is_held_while_installing_and_a_second_one_ignored_while_cleaning_up():
    reached = []
    with termination_as_exception():
        with pytest.raises(Terminated) as e:
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # the handler runs here, and must only note the signal
                reached.append("end of the block")
        os.kill(os.getpid(), signal.SIGTERM)  # cleaning up now: ignored, not a second exception
        time.sleep(0.1)
    assert reached == ["end of the block"] and e.value.exit_code == 143
