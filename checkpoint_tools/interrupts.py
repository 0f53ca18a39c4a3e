"""SIGTERM (and SIGHUP) become an exception, as Python already does for SIGINT, so the cleanup in `with` blocks runs
when a cluster scheduler stops a conversion at its time limit or a terminal closes.

Only the first signal raises: schedulers repeat SIGTERM, users press Ctrl-C twice, and a second exception would
abort the cleanup half way. Inside `interrupts_deferred()` (the renames that install a finished checkpoint) a
signal is held and raised when the block ends, so it lands before or after the install, never between its steps.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator, Optional

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM or SIGHUP; a BaseException like KeyboardInterrupt, so `except
    Exception` in between does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by this signal


_state = {"raised": False, "deferred": 0, "pending": None}


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum: int, frame) -> None:
    if _state["raised"]:
        # os.write, not print: the main thread may be inside a write to stderr right now.
        os.write(2, f"{signal.Signals(signum).name} ignored: still removing partial output\n".encode())
        return
    if _state["deferred"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state["raised"] = True
    raise _exception(signum)


@contextlib.contextmanager
def termination_as_exception() -> Iterator[None]:
    """Install the handlers for the duration of the block and restore the previous ones after. Main thread only; a
    signal the parent set to be ignored (nohup, `&` in a script) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in HANDLED:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _handler)
    _state.update(raised=False, pending=None)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a signal that arrives inside the block and raise it at the end (only with the handlers installed)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
        if not _state["deferred"] and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            _state["raised"] = True
            raise _exception(signum)


# ---- child processes: stop them before the cleanup that follows an interrupt ----

def die_with_parent() -> None:
    """Arm the calling process to get SIGTERM when its parent dies (a torchrun worker whose agent was stopped
    before it could stop its workers: a SIGTERM during start-up can do that). No-op where prctl is unavailable."""
    arm = _die_with(os.getppid())
    if arm is not None:
        arm()


def _die_with(parent: int):
    """For the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux), so a killed
    conversion's torchrun stops its workers instead of leaving them writing into a folder the next run removes."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child must not dlopen
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def run_child(cmd: list[str], env: Optional[dict] = None, timeout: Optional[float] = None,
              grace: float = 60.0, on_stderr_line: Optional[Callable[[str], None]] = None
              ) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` that, on an interrupt (Ctrl-C, SIGTERM, timeout), asks
    the child to stop with SIGTERM and waits up to `grace` seconds before SIGKILL. subprocess.run would SIGKILL it
    at once, and a SIGKILLed torchrun cannot stop its workers, which run on in their own sessions.

    The child runs in its own session, so a Ctrl-C in the terminal reaches only us and it is stopped once, in order.
    `on_stderr_line`, when given, sees each stderr line as it arrives (progress), and the line is still captured.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with(os.getpid()))
    try:
        if on_stderr_line is None:
            out, err = proc.communicate(timeout=timeout)
        else:
            out, err = _stream(proc, on_stderr_line, timeout)
    except BaseException:
        proc.terminate()
        try:
            if on_stderr_line is None:
                proc.communicate(timeout=grace)
            else:
                # The pump threads still drain both pipes. communicate() here would race them for each read and
                # could block in os.read past its timeout, until the last holder of the pipe exits.
                proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stream(proc: subprocess.Popen, on_line: Callable[[str], None], timeout: Optional[float]) -> tuple[str, str]:
    """Read both pipes to the end (a thread each, so neither can fill up and block the child), handing stderr lines
    to `on_line` from the calling thread as they come."""
    lines: queue.Queue = queue.Queue()
    out_parts: list[str] = []

    def pump_stdout():
        out_parts.append(proc.stdout.read())

    def pump_stderr():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threads = [threading.Thread(target=pump_stdout, daemon=True), threading.Thread(target=pump_stderr, daemon=True)]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    err_parts: list[str] = []
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            line = lines.get(timeout=left if left is not None else None)
        except queue.Empty:
            raise subprocess.TimeoutExpired(proc.args, timeout) from None
        if line is None:
            break
        err_parts.append(line)
        on_line(line.rstrip("\n"))
    for t in threads:
        t.join()
    proc.wait()
    return "".join(out_parts), "".join(err_parts)
