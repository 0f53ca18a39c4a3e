"""Run megatron-core worker jobs under torchrun (gloo on CPU) and collect their results.

Conversion (torch_dist save/load), verification (logits) and the demo (generation) all need real megatron-core
models at a checkpoint's own TP x PP; they describe what to do as JSON jobs for `megatron_bridge.mcore_worker`
and this module starts one `torchrun` for the lot, so the launcher lives apart from every caller.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from typing import Optional

from checkpoint_tools.interrupts import run_child
from checkpoint_tools.pickle_trust import PolicyLike, load_torch_file, trust_policy


def run_mcore_jobs(jobs: list[dict], nproc: int, timeout: Optional[int] = None,
                   policy: PolicyLike = None) -> list[dict]:
    """Run worker jobs under `torchrun --nproc_per_node nproc` (gloo on CPU) and return each job's result.
    `policy`: the pickle trust policy (or extra 'MODULE.NAME' globals) the workers load checkpoints under."""
    trust = trust_policy(policy).to_json()
    with tempfile.TemporaryDirectory(prefix="mcore-jobs-") as tmp:
        for i, job in enumerate(jobs):
            job.setdefault("out", os.path.join(tmp, f"result{i}.pt"))
            job.setdefault("trust", trust)
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(jobs, f)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "megatron_bridge.mcore_worker", path]
        # Not subprocess.run: on Ctrl-C or SIGTERM it would SIGKILL torchrun, orphaning the workers.
        proc = run_child(cmd, env=env, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"megatron-core worker failed (exit {proc.returncode}):\n{tail}")
        # Save jobs (to_torch_dist, to_legacy) write checkpoints, not results.
        # Results are pickles too: they load like every other one, through the trust policy.
        return [load_torch_file(j["out"], mmap=False) if j["task"] in ("logits", "generate") else None
                for j in jobs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
