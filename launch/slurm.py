"""`python -m launch submit JOB ...` and `python -m launch jobs`: the project's jobs on a Slurm cluster.

submit  checks the request (the job's own parser, TP x PP against the allocation, ...), renders the batch script
        (launch/slurm_script.py), hands that very text to sbatch, and records the job in <log dir>/jobs.jsonl; infer
        gets its merge step as a second job with --dependency=afterok. A refusal by Slurm (unknown partition, a
        request no node can satisfy) is printed as Slurm said it, and nothing stays submitted.
jobs    the recorded jobs: state, runs (requeues), exit code, from Slurm while it knows the job and from the
        script's own status file after that (clusters without accounting forget finished jobs); the last lines of
        a running or failed job's log.

Job options that share a name with a submit option (convert's --dry-run) go after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

from launch import slurm_script
from launch.slurm_script import JOBS, SubmitOptions

REGISTRY = "jobs.jsonl"
FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "CANCELLED",
                 "REQUEUE_LIMIT", "PREEMPTED"}


def _submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch submit JOB [job options]", allow_abbrev=False,
                                description="Send a JOB (convert, pretrain_gpt, sft, pretrain_hf, infer) to Slurm "
                                "as a generated, readable sbatch script: torchrun on every node from Slurm's "
                                "environment, save and requeue before the time limit. Options this parser does not "
                                "know are the JOB's; put the JOB's options after -- when a name is shared.")
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 for CPU nodes (default 0)")
    p.add_argument("--nproc-per-node", type=int,
                   help="processes per node for torchrun JOBs (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", help="time limit, as sbatch takes it (e.g. 4:00:00, 2-00:00:00)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--qos", help="quality of service")
    p.add_argument("--constraint", help="node features required (sbatch --constraint)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes for this job")
    p.add_argument("--mem", help="memory per node (e.g. 200G)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (the torchrun and its ranks)")
    p.add_argument("--env-setup", help="shell file the script sources first (module loads, venv activation)")
    p.add_argument("--container-image", help="run the steps in this container (pyxis/enroot srun flags)")
    p.add_argument("--job-name", help="Slurm job name (default wb-JOB)")
    p.add_argument("--log-dir", default="slurm_logs",
                   help="logs, status files, saved scripts and the job list (default slurm_logs)")
    p.add_argument("--python", default=sys.executable, help="Python on the nodes (default: this one)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="the save signal comes this many seconds before the time limit (default 300)")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="times a job stopped by its time limit or preemption requeues itself (default 3; 0: never)")
    p.add_argument("--dry-run", action="store_true", help="print the script(s) and submit nothing")
    p.add_argument("--write", metavar="FILE", help="write the script to FILE (infer's merge to FILE.merge) and "
                                                   "submit nothing: edit it, then sbatch FILE")
    return p


def parse_submit(argv: list[str]) -> tuple[str, list[str], argparse.Namespace, SubmitOptions]:
    """JOB, the job's args, the submit flags and options. Unknown options belong to the job; `--` ends ours."""
    if not argv or argv[0].startswith("-"):
        _submit_parser().print_usage(sys.stderr)
        raise ValueError(f"submit needs a JOB first: one of {', '.join(JOBS)}")
    job, rest = argv[0], argv[1:]
    after: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, after = rest[:i], rest[i + 1:]
    a, job_args = _submit_parser().parse_known_args(rest)
    opts = SubmitOptions(nodes=a.nodes, gpus_per_node=a.gpus_per_node, nproc_per_node=a.nproc_per_node,
                         partition=a.partition, time=a.time, account=a.account, qos=a.qos, constraint=a.constraint,
                         exclusive=a.exclusive, mem=a.mem, cpus_per_task=a.cpus_per_task, env_setup=a.env_setup,
                         container_image=a.container_image, job_name=a.job_name, log_dir=a.log_dir,
                         python=a.python, signal_seconds=a.signal_seconds, max_requeues=a.max_requeues)
    return job, [*job_args, *after], a, opts


def _sbatch(script: str, extra: list[str], test_only: bool = False) -> str:
    """Submit `script` (the text itself, on stdin) and return the job id; a refusal raises with Slurm's words.

    `test_only` asks Slurm whether the request could ever run (sbatch --test-only) without submitting: sbatch
    itself queues a job that asks for more nodes or CPUs than the partition has, and it would pend for ever."""
    cmd = ["sbatch", "--test-only" if test_only else "--parsable", *extra]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        said = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip()) or f"exit {proc.returncode}"
        raise SlurmRefused(said)
    return proc.stdout.strip().split(";")[0]


class SlurmRefused(RuntimeError):
    pass


def submit(job: str, job_args: list[str], opts: SubmitOptions) -> dict:
    """Check, render, submit; returns the registry record. Nothing stays submitted when any sbatch fails."""
    job_args = slurm_script.check(job, job_args, opts)
    script = slurm_script.render(job, job_args, opts)
    log_dir = os.path.abspath(os.path.join(opts.workdir, opts.log_dir))
    os.makedirs(log_dir, exist_ok=True)
    merge_script = slurm_script.render_merge(job_args, opts) if job == "infer" else None
    for text in filter(None, (script, merge_script)):  # every job of the request could run, or none is submitted
        _sbatch(text, [], test_only=True)
    job_id = _sbatch(script, [])
    name = slurm_script.job_name(job, opts)
    record = {"id": job_id, "job": job, "name": name, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "nodes": opts.nodes, "log": os.path.join(log_dir, f"{name}-{job_id}.out"),
              "script": os.path.join(log_dir, f"{name}-{job_id}.sbatch"), "args": job_args}
    records = [record]
    if job == "infer":
        try:
            merge_id = _sbatch(merge_script, [f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes"])
        except SlurmRefused:
            subprocess.run(["scancel", job_id], capture_output=True)  # no inference without its merge
            raise
        merge_name = name + "-merge"
        records.append({"id": merge_id, "job": "infer-merge", "name": merge_name, "after": job_id,
                        "submitted": record["submitted"], "nodes": 1,
                        "log": os.path.join(log_dir, f"{merge_name}-{merge_id}.out"),
                        "script": os.path.join(log_dir, f"{merge_name}-{merge_id}.sbatch"), "args": job_args})
        record["merge"] = merge_id
    with open(record["script"], "w") as f:
        f.write(script)
    if job == "infer":
        with open(records[1]["script"], "w") as f:
            f.write(merge_script)
    with open(os.path.join(log_dir, REGISTRY), "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return record


def submit_main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        _submit_parser().print_help()
        print(f"\nJOB is one of: {', '.join(JOBS)}; its options are its own (python -m launch JOB --help).")
        return 0
    try:
        job, job_args, a, opts = parse_submit(argv)
        if a.dry_run or a.write:
            checked = slurm_script.check(job, job_args, opts)
            scripts = [slurm_script.render(job, checked, opts)]
            if job == "infer":
                scripts.append(slurm_script.render_merge(checked, opts))
            if a.write:
                for path, text in zip([a.write, a.write + ".merge"], scripts):
                    with open(path, "w") as f:
                        f.write(text)
                    print(f"wrote {path}")
                if job == "infer":
                    print(f"submit: jid=$(sbatch --parsable {a.write}) && "
                          f"sbatch --dependency=afterok:$jid {a.write}.merge")
                else:
                    print(f"submit: sbatch {a.write}")
            if a.dry_run:
                print("\n# ---- merge job (sbatch --dependency=afterok:<job id>) ----\n".join(scripts), end="")
            return 0
        record = submit(job, job_args, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SlurmRefused as e:
        print(f"error: Slurm refused the job, nothing was submitted: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: not found; submit needs Slurm's sbatch on PATH (run it on a login node)",
              file=sys.stderr)
        return 2
    print(f"submitted job {record['id']} ({job}, {opts.nodes} node(s)); log {record['log']}")
    if "merge" in record:
        print(f"submitted job {record['merge']} (infer-merge) to run after job {record['id']} succeeds")
    print("status: python -m launch jobs" + ("" if opts.log_dir == "slurm_logs" else f" --log-dir {opts.log_dir}"))
    return 0


# ----------------------------------------------------------------------------------------------------- jobs

def slurm_state(job_id: str) -> Optional[dict]:
    """What Slurm says of a job while it remembers it (scontrol), else None."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    return {"state": fields.get("JobState", "?"), "reason": fields.get("Reason", ""),
            "exit": fields.get("ExitCode", ""), "restarts": int(fields.get("Restarts", "0") or 0),
            "elapsed": fields.get("RunTime", ""), "nodes": fields.get("NodeList", "")}


def status_file(record: dict) -> list[dict]:
    """The script's own lines, one per run: run=, exit=, state=."""
    path = os.path.splitext(record["log"])[0] + slurm_script.STATUS_SUFFIX
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in f if line.strip()]


def job_status(record: dict) -> dict:
    runs = status_file(record)
    live = slurm_state(record["id"])
    if live is not None:
        state = live["state"]
        if state in ("COMPLETED", "FAILED") and runs and runs[-1].get("state") == "REQUEUE_LIMIT":
            state = "REQUEUE_LIMIT"
        running = state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")
        code = live["exit"].split(":")[0] if live["exit"] and not running else ""
        return {"state": state, "exit": code, "runs": live["restarts"] + 1, "elapsed": live["elapsed"],
                "reason": live["reason"] if state == "PENDING" else "", "nodes": live["nodes"]}
    if runs:
        last = runs[-1]
        return {"state": last.get("state", "?"), "exit": last.get("exit", ""), "runs": len(runs), "elapsed": "",
                "reason": "", "nodes": ""}
    return {"state": "UNKNOWN", "exit": "", "runs": 0, "elapsed": "", "reason": "(Slurm no longer knows it and "
            "it left no status file: it ended before its script ran)", "nodes": ""}


def tail(path: str, lines: int) -> list[str]:
    if not os.path.exists(path):
        return [f"(no log yet at {path})"]
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return text.splitlines()[-lines:]


def read_registry(log_dir: str) -> list[dict]:
    path = os.path.join(log_dir, REGISTRY)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a hand edit or a cut-off write: say where, keep the other jobs
                print(f"warning: {path}:{number} is not a job record (not JSON); skipped", file=sys.stderr)
    return records


def jobs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m launch jobs", description="State and log tails of the jobs "
                                "`python -m launch submit` sent (read from --log-dir).")
    p.add_argument("ids", nargs="*", help="only these job ids")
    p.add_argument("--log-dir", default="slurm_logs", help="the submit --log-dir (default slurm_logs)")
    p.add_argument("--tail", type=int, default=3, help="log lines shown per running job (failed: at least 20)")
    a = p.parse_args(argv)
    records = [r for r in read_registry(a.log_dir) if not a.ids or r["id"] in a.ids]
    if not records:
        where = os.path.join(a.log_dir, REGISTRY)
        print(f"no jobs recorded in {where}" + (f" with ids {a.ids}" if a.ids else "") +
              "; submit one with python -m launch submit JOB ...")
        return 0 if not a.ids else 1
    rows = [(r, job_status(r)) for r in records]
    header = ("JOBID", "JOB", "STATE", "RUNS", "EXIT", "ELAPSED", "NODES", "LOG")
    table = [header] + [(r["id"], r["job"], s["state"] + (f" ({s['reason']})" if s["reason"] else ""),
                         str(s["runs"]), s["exit"], s["elapsed"], s["nodes"], r["log"]) for r, s in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r, s in rows:
        failed = s["state"] in FAILED_STATES
        if failed or s["state"] == "RUNNING":
            n = max(a.tail, 20) if failed else a.tail
            what = f"failed with exit code {s['exit'] or '?'}" if failed else "running"
            print(f"\n== job {r['id']} ({r['job']}) {what}; last {n} lines of {r['log']}:")
            for line in tail(r["log"], n):
                print(f"   {line}")
    return 0


def main(argv: list[str]) -> int:
    """`submit ...` or `jobs ...` (argv starts with the command)."""
    if argv[0] == "submit":
        return submit_main(argv[1:])
    return jobs_main(argv[1:])


__all__ = ["submit", "submit_main", "jobs_main", "job_status", "main", "parse_submit"]
