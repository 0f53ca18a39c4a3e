"""The sbatch scripts `python -m launch submit` writes: one readable, commented script per job, from a table of JOBs.

Each JOB (convert, pretrain_gpt, sft, pretrain_hf, infer) is one row of JOBS: how it starts on the nodes (one
torchrun per node, one task per node, or one task), which signal makes it save and stop, and how a requeued run
carries on. Every check that can refuse a request runs here, before anything reaches Slurm.

The script is exactly what is submitted (the submitter passes the rendered text to sbatch); `--dry-run` prints it,
`--write FILE` keeps it for hand edits. Its parts, in order: #SBATCH lines; the environment; the rendezvous (first
node of the allocation, a port derived from the job id); resume (what a requeued run loads); the step under srun;
the preemption trap (save, then `scontrol requeue`, at most --max-requeues times); a status line for `launch jobs`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

STATUS_SUFFIX = ".status"  # <log dir>/<job name>-<job id>.status: one line per run of the job (requeues append)


@dataclass
class SubmitOptions:
    """Where and how the job runs; every field maps to one #SBATCH line or one line of the script."""
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None  # processes per node; default: one per GPU, or 1 on CPU nodes
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    mem: Optional[str] = None
    cpus_per_task: Optional[int] = None
    env_setup: Optional[str] = None
    container_image: Optional[str] = None
    job_name: Optional[str] = None
    log_dir: str = "slurm_logs"
    workdir: str = field(default_factory=os.getcwd)
    python: str = field(default_factory=lambda: sys.executable)
    signal_seconds: int = 300  # the save signal comes this long before the time limit
    max_requeues: int = 3

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world(self) -> int:
        return self.nodes * self.procs


@dataclass(frozen=True)
class JobKind:
    """One JOB: its entry point, how it runs on the nodes, how it stops and how it carries on after a requeue."""
    entry: tuple[str, ...]           # after `python`: the module and any subcommand
    launch: str                      # "torchrun": one per node; "per_node": one task per node; "single": one task
    stop_signal: str                 # what the ranks get when Slurm's warning arrives
    resume: str                      # one line for the script and the README: how a requeued run carries on
    check: Callable[[list[str], SubmitOptions], list[str]]  # validates, returns the job args to run


def _parse(parser: argparse.ArgumentParser, args: list[str], job: str, known_only: bool = False):
    """The job's own parser checks its options now, so a typo fails before submission, not in the queue."""
    try:
        if known_only:
            return parser.parse_known_args(args)[0]
        return parser.parse_args(args)
    except SystemExit:
        raise ValueError(f"the {job} options above are refused by its own parser; fix them (python -m launch "
                         f"{job} --help lists them)") from None


def _one_node(job: str, opts: SubmitOptions) -> None:
    if opts.nodes != 1:
        raise ValueError(f"{job} runs on one node; --nodes {opts.nodes} would leave nodes idle: use --nodes 1")


def _check_convert(args: list[str], opts: SubmitOptions) -> list[str]:
    from launch.cli import build_parser

    _one_node("convert", opts)
    _parse(build_parser(), ["convert", *args], "convert")
    return args


def _check_pretrain_gpt(args: list[str], opts: SubmitOptions) -> list[str]:
    from launch.pretrain_gpt import build_parser

    a = _parse(build_parser(), args, "pretrain_gpt")
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or opts.world % (tp * pp):
        ok = sorted(d for d in range(1, opts.world + 1) if opts.world % d == 0)
        raise ValueError(f"TP={tp} x PP={pp} = {tp * pp} does not divide the {opts.world} ranks of {opts.nodes} "
                         f"node(s) x {opts.procs} process(es) per node; use TP x PP in {ok}, or change --nodes / "
                         f"--gpus-per-node")
    if opts.max_requeues > 0 and not a.save:
        raise ValueError("pretrain_gpt on Slurm needs --save: a job stopped by its time limit or preemption saves "
                         "there and its requeued run resumes from it (or pass --max-requeues 0)")
    return _with_exit_signal("pretrain_gpt", args, a)


def _with_exit_signal(job: str, args: list[str], parsed) -> list[str]:
    """The ranks must save on the signal the script sends (SIGUSR1: torchrun would kill them on SIGTERM first)."""
    wanted = JOBS[job].stop_signal
    if parsed.exit_signal_handler and parsed.exit_signal != wanted:
        raise ValueError(f"--exit-signal {parsed.exit_signal}: the Slurm script sends {wanted} (torchrun stops its "
                         f"workers on SIGTERM before they can save); drop --exit-signal")
    if not parsed.exit_signal_handler:
        args = [*args, "--exit-signal-handler", "--exit-signal", wanted]
    return args


def _check_trainer(job: str) -> Callable[[list[str], SubmitOptions], list[str]]:
    def check(args: list[str], opts: SubmitOptions) -> list[str]:
        import importlib

        module = importlib.import_module(f"launch.{job}")
        a = _parse(module.build_parser(), args, job, known_only=True)  # TrainingArguments fields pass through
        if getattr(a, "no_resume", False) and opts.max_requeues > 0:
            raise ValueError(f"{job} --no-resume would make every requeued run start over; drop it (or pass "
                             f"--max-requeues 0)")
        return _with_exit_signal(job, args, a)
    return check


def _check_infer(args: list[str], opts: SubmitOptions) -> list[str]:
    from launch.multi_infer import build_parser

    a = _parse(build_parser(), args, "infer")
    if a.nodes is not None or a.node_rank is not None:
        raise ValueError("infer under Slurm takes its node count and rank from Slurm (one task per node): drop "
                         "--nodes/--node-rank, use submit's --nodes")
    if a.force:
        raise ValueError("infer --force would delete the part files a requeued run resumes from; drop it")
    return args


JOBS: dict[str, JobKind] = {
    "convert": JobKind(("-m", "launch", "convert"), "single", "SIGTERM",
                       "a conversion starts over (SIGTERM removes its partial output)", _check_convert),
    "pretrain_gpt": JobKind(("-m", "launch.pretrain_gpt"), "torchrun", "SIGUSR1",
                            "loads --save once it holds a checkpoint (--exit-signal-handler saved it)",
                            _check_pretrain_gpt),
    "sft": JobKind(("-m", "launch.sft"), "torchrun", "SIGUSR1",
                   "the Trainer resumes from the checkpoint-N it saved on the signal (--exit-signal-handler)",
                   _check_trainer("sft")),
    "pretrain_hf": JobKind(("-m", "launch.pretrain_hf"), "torchrun", "SIGUSR1",
                           "the Trainer resumes from the checkpoint-N it saved on the signal (--exit-signal-handler)",
                           _check_trainer("pretrain_hf")),
    "infer": JobKind(("-m", "launch", "infer"), "per_node", "SIGTERM",
                     "finished items are in OUT.parts/ (flushed per item) and are skipped", _check_infer),
}


def _option(args: list[str], names: tuple[str, ...]) -> tuple[Optional[str], list[str]]:
    """(value of the last of `names` in args, args without it): `--load X` and `--load=X` both."""
    value, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a in names and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if any(a.startswith(n + "=") for n in names):
            value, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    return value, rest


def _q(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def _array(name: str, args: list[str]) -> list[str]:
    """A bash array, one option (with its values) a line, so a long command stays readable and easy to edit."""
    groups: list[list[str]] = []
    for a in args:
        if not groups or (a.startswith("--") and groups[-1]):
            groups.append([])
        groups[-1].append(a)
    if len(groups) <= 1:
        return [f"{name}=({_q(args)})"]
    return [f"{name}=("] + [f"  {_q(g)}" for g in groups] + [")"]


def _abs(path: str, workdir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(workdir, path))


def check(job: str, job_args: list[str], opts: SubmitOptions) -> list[str]:
    """Every refusal before submission; returns the job args the script runs."""
    if job not in JOBS:
        raise ValueError(f"unknown JOB {job!r}; use one of {', '.join(JOBS)}")
    if opts.nodes < 1:
        raise ValueError(f"--nodes {opts.nodes}: need at least 1")
    if opts.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {opts.gpus_per_node}: use 0 (CPU nodes) or more")
    if opts.nproc_per_node is not None and opts.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {opts.nproc_per_node}: need at least 1")
    if opts.gpus_per_node and opts.nproc_per_node and opts.nproc_per_node != opts.gpus_per_node:
        raise ValueError(f"--nproc-per-node {opts.nproc_per_node} with --gpus-per-node {opts.gpus_per_node}: "
                         f"torchrun runs one process per GPU; drop --nproc-per-node")
    if opts.max_requeues < 0:
        raise ValueError(f"--max-requeues {opts.max_requeues}: use 0 (never requeue) or more")
    if opts.signal_seconds < 1:
        raise ValueError(f"--signal-seconds {opts.signal_seconds}: need at least 1")
    if opts.env_setup and not os.path.isfile(_abs(opts.env_setup, opts.workdir)):
        raise ValueError(f"--env-setup {opts.env_setup}: no such file; give a shell file to source (module load, "
                         f"venv activation)")
    return JOBS[job].check(list(job_args), opts)


def job_name(job: str, opts: SubmitOptions) -> str:
    return opts.job_name or f"wb-{job}"


def _sbatch_lines(name: str, job: str, opts: SubmitOptions, tasks_per_node: int) -> list[str]:
    log_dir = _abs(opts.log_dir, opts.workdir)
    lines = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={opts.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    for flag, value in (("cpus-per-task", opts.cpus_per_task), ("partition", opts.partition),
                        ("time", opts.time), ("account", opts.account), ("qos", opts.qos),
                        ("constraint", opts.constraint), ("mem", opts.mem)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    if opts.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [
        f"#SBATCH --chdir={opts.workdir}",
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "# A requeued run appends to the same log.",
        "#SBATCH --open-mode=append",
    ]
    if opts.max_requeues > 0:
        lines += [
            f"# This script gets SIGUSR1 {opts.signal_seconds} s before the time limit (see the trap below).",
            "#SBATCH --requeue",
            f"#SBATCH --signal=B:USR1@{opts.signal_seconds}",
        ]
    else:
        lines.append("#SBATCH --no-requeue")
    return lines


def _srun(opts: SubmitOptions, *flags: str) -> str:
    words = ["srun", *flags, "--kill-on-bad-exit=1"]
    if opts.container_image:  # pyxis/enroot: the same paths inside the container
        words += [f"--container-image={opts.container_image}", f"--container-mounts={opts.workdir}",
                  f"--container-workdir={opts.workdir}"]
    return " ".join(shlex.quote(w) if not w.startswith("--") else w for w in words)


def render(job: str, job_args: list[str], opts: SubmitOptions) -> str:
    """The batch script for an already-checked request (see `check`)."""
    kind = JOBS[job]
    name = job_name(job, opts)
    log_dir = _abs(opts.log_dir, opts.workdir)
    tasks_per_node = 1
    out = ["#!/bin/bash",
           f"# {job} on {opts.nodes} node(s), generated by `python -m launch submit {job}` (Megatron Workbench).",
           "# Submit it as is with sbatch, or edit it first; `python -m launch jobs` shows its state and log.",
           *_sbatch_lines(name, job, opts, tasks_per_node), ""]
    out += [
        "# Time limit or preemption: Slurm sends this script SIGUSR1; the step's processes get "
        f"{kind.stop_signal.replace('SIG', '')}",
        f"# ({'they save and stop' if kind.stop_signal == 'SIGUSR1' else 'they stop'}); then the job requeues itself "
        "and the next run carries on.",
        "preempted=0 woke=0",
        "on_warning() {",
        "  preempted=1 woke=1",
        f'  echo "workbench: $(date -u +%FT%TZ) Slurm warning received; sending {kind.stop_signal} to the step"',
        f'  scancel --signal={kind.stop_signal.replace("SIG", "")} "$SLURM_JOB_ID"',
        "}",
        "trap on_warning USR1  # first of all: bash's default for USR1 would end this script",
        "",
    ]
    if opts.env_setup:  # before `set -u`: module and conda scripts read unset variables
        out += ["# Site set-up (modules, virtual environment), from --env-setup",
                f"source {shlex.quote(_abs(opts.env_setup, opts.workdir))}"]
    out += ["set -uo pipefail", f"mkdir -p {shlex.quote(log_dir)}"]
    out += [f"export PYTHON={shlex.quote(opts.python)}",
            f"STATUS={shlex.quote(log_dir)}/\"$SLURM_JOB_NAME-$SLURM_JOB_ID{STATUS_SUFFIX}\"",
            f"MAX_REQUEUES={opts.max_requeues}",
            'RUN=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))',
            'echo "workbench: run $RUN of job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"', ""]

    args = list(job_args)
    if job == "pretrain_gpt":
        load, args = _option(args, ("--load",))
        save, _ = _option(args, ("--save",))
        out += ["# Resume: once --save holds a checkpoint (this job saved it before a requeue), train from there."]
        out.append(f"LOAD=({_q(['--load', load])})" if load else "LOAD=()")
        if save:
            out += [f"if [ -f {shlex.quote(save)}/latest_checkpointed_iteration.txt ]; then "
                    f"LOAD=(--load {shlex.quote(save)}); fi"]
        args_expr = '"${JOB_ARGS[@]}" "${LOAD[@]}"'
    else:
        out.append(f"# Resume: {kind.resume}.")
        args_expr = '"${JOB_ARGS[@]}"'
    out += _array("JOB_ARGS", args) + [""]

    if kind.launch == "torchrun":
        out += [
            "# Rendezvous: torchrun's c10d store on the first node of the allocation (where this script runs), on",
            "# a port derived from the job id so that two jobs sharing a node do not collide.",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            'head_addr=$(scontrol show node "$head_node" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')',
            'export RDZV_ENDPOINT="${head_addr:-$head_node}:$(( 20000 + SLURM_JOB_ID % 20000 ))"',
            "",
            f"# One torchrun per node; each starts {opts.procs} rank(s). SIGUSR1 is ignored by torchrun (so it keeps",
            "# its workers alive) and caught by the ranks, which save and stop together.",
            _srun(opts, "--ntasks-per-node=1") + " bash -c '",
            "  trap \"\" USR1",
            "  exec \"$PYTHON\" -m torch.distributed.run --nnodes \"$SLURM_NNODES\" --node-rank \"$SLURM_NODEID\" \\",
            f"    --nproc-per-node {opts.procs} --rdzv-backend c10d --rdzv-endpoint \"$RDZV_ENDPOINT\" \\",
            "    --rdzv-id \"$SLURM_JOB_ID\" --max-restarts 0 \"$@\"' torchrun \\",
            f"  {_q(kind.entry)} {args_expr} &",
        ]
    elif kind.launch == "per_node":
        out += [
            "# One task per node; each takes every N-th input line (Slurm's SLURM_NTASKS / SLURM_PROCID).",
            f"{_srun(opts, '--ntasks-per-node=1')} \"$PYTHON\" {_q(kind.entry)} {args_expr} &",
        ]
    else:
        out += [f"{_srun(opts, '--nodes=1', '--ntasks=1')} \"$PYTHON\" {_q(kind.entry)} {args_expr} &"]
    out += ["step=$!", ""]
    out += [
        "# wait returns early when the trap runs; wait again until it returns the step's own exit status",
        "while :; do",
        "  woke=0",
        '  wait "$step"; rc=$?',
        '  [ "$woke" = 1 ] && [ "$rc" -gt 128 ] || break',
        "done",
        "",
        'if [ "$preempted" = 1 ]; then',
        '  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then',
        '    echo "run=$RUN exit=$rc state=REQUEUED" >> "$STATUS"',
        '    echo "workbench: step ended ($rc); requeueing (run $((RUN + 1)) of at most $((MAX_REQUEUES + 1)))"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "  fi",
        '  echo "workbench: stopped by the warning signal, and --max-requeues $MAX_REQUEUES is used up: not '
        'requeued"',
        '  echo "run=$RUN exit=$rc state=REQUEUE_LIMIT" >> "$STATUS"',
        '  [ "$rc" -ne 0 ] || rc=1',
        '  exit "$rc"',
        "fi",
        'echo "run=$RUN exit=$rc state=$([ "$rc" -eq 0 ] && echo COMPLETED || echo FAILED)" >> "$STATUS"',
        'exit "$rc"',
    ]
    return "\n".join(out) + "\n"


def render_merge(job_args: list[str], opts: SubmitOptions) -> str:
    """infer's second job: join the nodes' part files into the ordered output once every node has finished."""
    from launch.multi_infer import build_parser

    a = build_parser().parse_args(job_args)
    log_dir = _abs(opts.log_dir, opts.workdir)
    name = job_name("infer", opts) + "-merge"
    lines = ["#!/bin/bash",
             "# The merge step of a multi-node `infer`, submitted with --dependency=afterok:<infer job>.",
             f"#SBATCH --job-name={name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH --chdir={opts.workdir}", f"#SBATCH --output={log_dir}/%x-%j.out", ""]
    if opts.env_setup:
        lines.append(f"source {shlex.quote(_abs(opts.env_setup, opts.workdir))}")
    lines.append("set -uo pipefail")
    lines += [f"STATUS={shlex.quote(log_dir)}/\"$SLURM_JOB_NAME-$SLURM_JOB_ID{STATUS_SUFFIX}\"",
              f"{shlex.quote(opts.python)} -m launch infer-merge {_q([a.data, a.output])}",
              "rc=$?",
              'echo "run=1 exit=$rc state=$([ "$rc" -eq 0 ] && echo COMPLETED || echo FAILED)" >> "$STATUS"',
              'exit "$rc"']
    return "\n".join(lines) + "\n"
