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

from tqdm import tqdm

from checkpoint_tools.interrupts import run_child
from checkpoint_tools.pickle_trust import PolicyLike, load_torch_file, trust_policy

# Workers report progress as stderr lines with this prefix (global rank 0 only), STAGES_PER_JOB per job.
PROGRESS_PREFIX = "[workbench-progress] "
STAGES_PER_JOB = 2  # weights loaded, task done


def run_mcore_jobs(jobs: list[dict], nproc: int, timeout: Optional[int] = None,
                   policy: PolicyLike = None, progress: bool = False, desc: str = "megatron-core") -> list[dict]:
    """Run worker jobs under `torchrun --nproc_per_node nproc` (gloo on CPU) and return each job's result.
    `policy`: the pickle trust policy (or extra 'MODULE.NAME' globals) the workers load checkpoints under.
    `progress`: a bar that moves with the workers' stages (start-up, weights loaded, task done), so a long
    torch_dist save or load is not silence."""
    trust = trust_policy(policy).to_json()
    with tempfile.TemporaryDirectory(prefix="mcore-jobs-") as tmp:
        for i, job in enumerate(jobs):
            job.setdefault("out", os.path.join(tmp, f"result{i}.pt"))
            job.setdefault("trust", trust)
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(jobs, f)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "megatron_bridge.mcore_worker", path]
        bar = tqdm(total=len(jobs) * STAGES_PER_JOB, desc=f"{desc}: starting {nproc} workers", unit="step",
                   disable=not progress, bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}]")

        def on_line(line: str) -> None:
            if line.startswith(PROGRESS_PREFIX):
                bar.set_description_str(f"{desc}: {line[len(PROGRESS_PREFIX):]}")
                bar.update()

        # Not subprocess.run: on Ctrl-C or SIGTERM it would SIGKILL torchrun, orphaning the workers.
        try:
            proc = run_child(cmd, env=env, timeout=timeout, on_stderr_line=on_line)
        finally:
            bar.close()
        if proc.returncode != 0:
            output = [ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith(PROGRESS_PREFIX)]
            tail = "\n".join(output[-40:])
            raise RuntimeError(f"megatron-core worker failed (exit {proc.returncode}):\n{tail}")
        # Save jobs (to_torch_dist, to_legacy) write checkpoints, not results.
        # Results are pickles too: they load like every other one, through the trust policy.
        return [load_torch_file(j["out"], mmap=False) if j["task"] in ("logits", "generate") else None
                for j in jobs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
