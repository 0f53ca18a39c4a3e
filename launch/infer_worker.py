"""A replica's process: load the model on its device block, then take chunks from the coordinator until told to stop.

Each worker talks to the coordinator over its own pipe (a SIGKILLed process cannot leave a shared queue's lock
held) and appends every finished item to its own part file before it reports the chunk, so the coordinator can
always tell from the file what a dead worker had finished.

Fault injection (a debugging switch, documented in `infer --help`): WORKBENCH_INFER_FAULT="kill:ID" makes a worker
SIGKILL itself whenever the item with that id is about to be generated; "kill-once:ID" only on the item's first
attempt. It exercises the recovery paths (retry on another worker, setting a poison item aside) with a real
SIGKILL; it is read only by the worker and never named VLLM_* (vLLM reads that whole namespace).
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

FAULT_ENV = "WORKBENCH_INFER_FAULT"


def parse_fault(text: str | None) -> list[tuple[str, str]]:
    """'kill:7,kill-once:b' -> [('kill', '7'), ('kill-once', 'b')]."""
    out = []
    for part in (text or "").split(","):
        if part.strip():
            mode, _, item_id = part.strip().partition(":")
            if mode not in ("kill", "kill-once") or not item_id:
                raise ValueError(f"{FAULT_ENV}={text!r}: use kill:ID or kill-once:ID (comma-separated)")
            out.append((mode, item_id))
    return out


def _inject_fault(faults: list[tuple[str, str]], items: list[dict]) -> None:
    for mode, item_id in faults:
        for it in items:
            if str(it["id"]) == item_id and (mode == "kill" or it["attempt"] == 0):
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)


def _child_only_environment(backend: str, devices: list[str], threads: int) -> list[str]:
    """Settings of this process alone (the parent's environment is never edited). vLLM chooses GPUs by
    CUDA_VISIBLE_DEVICES, so its block is renumbered from 0 here; HF models take device names directly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if backend == "vllm":
        gpus = [d for d in devices if d != "cpu"]
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(d.split(":")[1] for d in gpus)
            devices = [f"cuda:{i}" for i in range(len(gpus))]
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return devices


def _own_process_group() -> None:
    """The worker leads a process group holding whatever it starts (a vLLM engine spawns processes that outlive
    their parent), so the coordinator can end the whole tree of a dead replica with one killpg before the
    devices are reused; and it dies with the coordinator (Linux PR_SET_PDEATHSIG), so a killed run leaves no
    worker writing part files behind a re-run."""
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(conn, spec: dict) -> None:
    """spec: node, slot, label (the `worker` field), devices, backend, model_dir, dtype, batch_size, parts, threads."""
    from launch.infer_store import PartWriter, part_file

    _own_process_group()
    devices = _child_only_environment(spec["backend"], list(spec["devices"]), spec["threads"])
    try:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        if all(d == "cpu" for d in devices):
            torch.set_num_threads(spec["threads"])
        from launch.infer_backends import make_backend

        faults = parse_fault(os.environ.get(FAULT_ENV))
        backend = make_backend(spec["backend"], spec["model_dir"], devices, spec["dtype"], spec["batch_size"])
    except BaseException as e:  # noqa: BLE001 - a load failure is reported, then the process ends
        lines = [ln for ln in traceback.format_exception_only(type(e), e) if ln.strip()]
        conn.send(("fatal", lines[-1].strip() if lines else repr(e)))
        conn.close()
        return
    writer = PartWriter(part_file(spec["parts"], spec["node"], spec["slot"], os.getpid()))
    conn.send(("ready", {"pid": os.getpid(), "part": writer.path}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone: nothing to report to
            break
        if msg[0] == "stop":
            break
        _, chunk_id, items = msg
        summary = []
        for group in backend.batches(items):
            batch = [items[i] for i in group]
            _inject_fault(faults, batch)
            for it, rec in zip(batch, backend.generate(batch)):
                writer.write({"key": it["key"], "index": it["index"], "id": it["id"], **rec, "worker": spec["label"]})
                summary.append({"key": it["key"], "output_tokens": rec.get("output_tokens", 0),
                                "error": rec.get("error")})
            writer.sync()
        try:
            conn.send(("done", chunk_id, summary))
        except (BrokenPipeError, OSError):
            break
    writer.close()
    conn.close()
    backend.close()  # multiprocessing ends a child with os._exit: finalizers that would stop an engine never run


__all__ = ["FAULT_ENV", "parse_fault", "worker_main"]
