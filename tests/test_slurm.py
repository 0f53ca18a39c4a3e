"""Slurm submission on a real Slurm cluster (Debian's packages, started by tests/_slurm_cluster.py: one controller and
two slurmd daemons, so 2-node jobs are real 2-node jobs with torchrun's c10d rendezvous across them).

Without the packages these tests fail with the reason and the install line: a skipped Slurm test would hide a broken
claim. Models and data are the tiny ones of the pretrain_gpt and inference tests.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from _infer_helpers import make_tiny_model, prompts, read_jsonl, reference, write_jsonl
from _pretrain_gpt_helpers import CHANNEL_RANGES, VOCAB, write_indexed
from _slurm_cluster import ClusterError, SlurmCluster
from conftest import make_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    try:
        try:
            c.start()
        except ClusterError as e:
            pytest.fail(f"cannot start the test Slurm cluster: {e}", pytrace=False)
        yield c
    finally:
        c.stop()
        assert not c.left_over, f"Slurm daemons still running after stop: {c.left_over}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_work")


def launch(cluster: SlurmCluster, cwd, *args: str) -> subprocess.CompletedProcess:
    """`python -m launch ...` as a user runs it on the login node (Slurm's client talks to the test cluster)."""
    env = dict(cluster.env, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=300)


def submitted(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return re.findall(r"submitted job (\d+)", proc.stdout)


def submit_here(cluster: SlurmCluster, cwd, *args: str) -> subprocess.CompletedProcess:
    """`python -m launch submit ...`, run in this process (the same code, without seconds of imports per call):
    from `cwd`, with the test cluster's Slurm client settings; the jobs inherit this environment, as with sbatch."""
    import contextlib
    import io

    from launch import slurm

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(cluster.env, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = slurm.main(["submit", *args])
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def status_lines(log_dir, job_id: str) -> list[str]:
    paths = glob.glob(os.path.join(str(log_dir), f"*-{job_id}.status"))
    return open(paths[0]).read().split("\n")[:-1] if paths else []


def scalar_events(tb_dir: str, tag: str) -> list[int]:
    """Every step written for `tag` in every event file (a step written twice appears twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


@pytest.fixture(scope="module")
def background(cluster, work):
    """The inference, conversion and failing jobs, submitted together at the start so that they run while the
    training test runs (the cluster has room for all of them); each test then waits for its own."""
    jobs = {}
    root = work / "infer"
    root.mkdir()
    model = make_tiny_model(str(root / "model"))
    rows = prompts(8)
    data = write_jsonl(str(root / "in.jsonl"), rows)
    proc = submit_here(cluster, root, "infer", model, data, "out.jsonl", "--max-new-tokens", "3", "--no-progress",
                       "--nodes", "2")
    jobs["infer"] = dict(root=root, model=model, rows=rows, proc=proc, ids=submitted(proc))

    root = work / "convert"
    hf = make_llama(str(root / "hf"))
    jobs["convert"] = dict(root=root, hf=hf, ids=submitted(
        submit_here(cluster, root, "convert", hf, "mg_tp2", "--tp", "2", "--no-progress")))

    root = work / "failing"
    root.mkdir()
    jobs["failing"] = dict(root=root, ids=submitted(
        submit_here(cluster, root, "convert", "no_such_model", "out", "--no-progress")))
    return jobs


# ---------------------------------------------------------------------------------------------------- training

ITERS = 80


def test_pretrain_gpt_on_two_nodes_preempted_requeued_resumed_and_converted(cluster, work, background):
    """A 2-node pretrain_gpt job (one rank per node, c10d rendezvous across the two slurmd) gets Slurm's warning
    signal mid-run: the ranks save at the same step, the job requeues itself, the second run resumes from that
    checkpoint and finishes. Every step 1..ITERS is logged exactly once across both runs, the final checkpoint
    counts ITERS x batch samples, and the converters read it back into a Hugging Face model that loads."""
    from checkpoint_tools.pickle_trust import load_torch_file
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron, megatron_to_hf
    from transformers import LlamaForCausalLM

    root = work / "pretrain"
    hf = make_llama(str(root / "hf"), vocab_size=VOCAB, max_position_embeddings=64)
    start = hf_to_megatron(hf, str(root / "mg"), ConvertOptions(progress=False))
    blend = []
    for i, c in enumerate(CHANNEL_RANGES):
        blend += ["1", write_indexed(str(root / c), c, docs=30, seed=i)]
    args = ["pretrain_gpt", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
            "--load", start, "--data-path", *blend, "--split", "100,0,0", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "1e-3",
            "--log-interval", "1", "--eval-iters", "0", "--data-cache-path", "cache", "--tensorboard-dir", "tb",
            "--save", "save"]

    dry = submit_here(cluster, root, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    script = dry.stdout
    # The rendezvous a 2-node torchrun needs, from Slurm's environment, evaluated on each node.
    for needed in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "srun --ntasks-per-node=1",
                   '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID"', "--nproc-per-node 1",
                   '--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"', '--rdzv-id "$SLURM_JOB_ID"',
                   'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                   '$(( 20000 + SLURM_JOB_ID % 20000 ))', "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                   "  --exit-signal-handler\n  --exit-signal SIGUSR1\n", "LOAD=(--load save)"):
        assert needed in script, needed

    (job_id,) = submitted(submit_here(cluster, root, *args))
    log_dir = root / "slurm_logs"
    log = str(log_dir / f"wb-pretrain_gpt-{job_id}.out")
    # What ran is exactly what --dry-run printed (Slurm keeps the submitted script).
    stored = cluster.run("scontrol", "write", "batch_script", job_id, "-").stdout
    assert stored == script

    # The signal handler is installed before this line is printed (on rank 0; the ranks agree by a MAX).
    wait_for(lambda: os.path.exists(log) and "starting at iteration 0" in read_log(log), 240, "the first step")
    # What Slurm does --signal seconds before the time limit: SIGUSR1 to the batch script only.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: status_lines(log_dir, job_id), 120, "the first run's status line")
    info = cluster.wait(job_id, timeout=300)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1" and info["NodeList"] == "wbn[1-2]", info
    assert status_lines(log_dir, job_id) == ["run=1 exit=0 state=REQUEUED", "run=2 exit=0 state=COMPLETED"], text

    stopped = int(re.search(r"iteration (\d+): received SIGUSR1: saving and exiting", text).group(1))
    assert 1 <= stopped < ITERS, text[-3000:]
    assert f"saved checkpoint at iteration {stopped} to save" in text
    assert f"resumed at iteration {stopped} ({stopped * 4} samples consumed)" in text
    # Nothing lost, nothing repeated: each step's loss written once, over the two runs.
    assert scalar_events(str(root / "tb"), "lm loss") == list(range(1, ITERS + 1))
    with open(root / "save" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == str(ITERS)
    saved = load_torch_file(str(root / "save" / f"iter_{ITERS:07d}" / "mp_rank_00" / "model_optim_rng.pt"))
    assert saved["args"].consumed_train_samples == ITERS * 4 and saved["args"].world_size == 2

    back = megatron_to_hf(str(root / "save"), str(root / "hf_back"), ConvertOptions(progress=False))
    model, loading = LlamaForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    trained = dict(model.named_parameters())
    original = dict(LlamaForCausalLM.from_pretrained(hf).named_parameters())
    assert not torch.equal(trained["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------------------- inference

def test_infer_on_two_nodes_then_dependent_merge_in_input_order(cluster, background):
    """infer with one task per node (each node every other line), then the merge job (afterok) writes the output:
    every line once, in input order, each equal to single-process generate()."""
    b = background["infer"]
    root, (job_id, merge_id) = b["root"], b["ids"]
    assert f"after job {job_id}" in b["proc"].stdout
    infer_info = cluster.wait(job_id, timeout=300)
    merge_info = cluster.wait(merge_id, timeout=120)
    assert merge_info["StartTime"] >= infer_info["EndTime"], (infer_info, merge_info)  # afterok held it back
    logs = "".join(read_log(p) for p in glob.glob(str(root / "slurm_logs" / "*.out")))
    assert infer_info["JobState"] == "COMPLETED" and infer_info["NodeList"] == "wbn[1-2]", logs[-3000:]
    assert merge_info["JobState"] == "COMPLETED", logs[-3000:]
    assert "infer-merge: wrote" in logs
    parts = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(str(root / "out.jsonl.parts" / "n*.jsonl")))
    assert set(parts) == {"n0", "n1"}, parts  # both nodes did a share
    out = read_jsonl(str(root / "out.jsonl"))
    expected = reference(b["model"], b["rows"], max_new_tokens=3)
    assert [r["id"] for r in out] == [e["id"] for e in expected]
    assert [(r["output"], r["output_tokens"]) for r in out] == [(e["output"], e["output_tokens"]) for e in expected]


# -------------------------------------------------------------------------------------------------- conversion

def test_convert_job_completes_and_round_trips(cluster, background):
    """A conversion job (HF -> Megatron TP=2) completes; converted back here, every tensor equals the source's."""
    from megatron_bridge.convert import ConvertOptions, megatron_to_hf
    from safetensors.torch import load_file

    b = background["convert"]
    root, hf, (job_id,) = b["root"], b["hf"], b["ids"]
    info = cluster.wait(job_id, timeout=240)
    assert info["JobState"] == "COMPLETED", read_log(str(root / "slurm_logs" / f"wb-convert-{job_id}.out"))
    assert sorted(os.listdir(root / "mg_tp2" / "release")) == ["mp_rank_00", "mp_rank_01"]
    back = megatron_to_hf(str(root / "mg_tp2"), str(root / "back"), ConvertOptions(progress=False))
    a, b = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- bad input

def _queue(cluster) -> str:
    return cluster.run("squeue", "-h", "-o", "%i %j").stdout


def test_refusals_leave_nothing_submitted(cluster, work, monkeypatch, capsys):
    """Slurm's refusal (unknown partition, more nodes than the cluster has) is shown as Slurm said it; a layout
    that cannot fit is refused before Slurm is asked; in every case no job is queued and none is recorded."""
    root = work / "refused"
    root.mkdir()
    (root / "in.jsonl").write_text('{"prompt": "hi"}\n')
    (root / "model").mkdir()
    before = _queue(cluster)
    cases = [
        (["infer", "model", "in.jsonl", "out.jsonl", "--partition", "nope"], "invalid partition specified: nope"),
        (["convert", "hf", "mg", "--partition", "debug", "--mem", "999G"],
         "Requested node configuration is not available"),
        (["convert", "hf", "mg", "--gpus-per-node", "8"], "Invalid generic resource (gres) specification"),
        (["infer", "model", "in.jsonl", "out.jsonl", "--nodes", "3"], "Requested node configuration is not available"),
        (["convert", "hf", "mg", "--cpus-per-task", "64"], "Requested node configuration is not available"),
        (["pretrain_gpt", "--tp", "2", "--pp", "2", "--nodes", "1", "--nproc-per-node", "2", "--seq-length", "8",
          "--save", "s"], "TP=2 x PP=2 = 4 does not divide the 2 ranks of 1 node(s) x 2 process(es) per node; "
                          "use TP x PP in [1, 2]"),
        (["pretrain_gpt", "--seq-length", "8", "--nodes", "1"], "pretrain_gpt on Slurm needs --save"),
        (["pretrain_gpt", "--seq-lenght", "8", "--save", "s"], "refused by its own parser"),
        (["convert", "hf", "mg", "--nodes", "2"], "convert runs on one node"),
        (["infer", "model", "in.jsonl", "out.jsonl", "--node-rank", "1"], "takes its node count and rank from Slurm"),
        (["train", "x"], "unknown JOB 'train'"),
    ]
    from launch import slurm

    monkeypatch.chdir(root)  # in-process (a subprocess per case costs seconds of imports): same code, same Slurm
    monkeypatch.setenv("SLURM_CONF", cluster.conf)
    for args, message in cases:
        code = slurm.main(["submit", *args])
        out, err = capsys.readouterr()
        assert code == 2, (args, out, err)
        assert message in err, (args, err)
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, err
    assert _queue(cluster) == before
    assert not os.path.exists(root / "slurm_logs" / "jobs.jsonl")


def test_jobs_shows_a_failed_job_with_its_exit_code_and_log(cluster, background):
    """A job that fails (a conversion of a folder that does not exist) is listed as FAILED with its exit code and
    the last lines of its log, the converter's own error among them."""
    b = background["failing"]
    root, (job_id,) = b["root"], b["ids"]
    info = cluster.wait(job_id, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    proc = launch(cluster, root, "jobs")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:5] == ["convert", "FAILED", "1", "2"], proc.stdout
    assert f"== job {job_id} (convert) failed with exit code 2" in proc.stdout
    assert "no_such_model" in proc.stdout.split(f"== job {job_id}")[1]


def test_requeue_cap_stops_a_job_preempted_once_too_often(cluster, work):
    """--max-requeues 1: the first warning requeues the job, the second ends it (REQUEUE_LIMIT, a failure that
    `jobs` names); Slurm counts one restart. A conversion stopped by the warning leaves no partial folder."""
    root = work / "capped"
    hf = make_llama(str(root / "hf"))
    (job_id,) = submitted(submit_here(cluster, root, "convert", hf, "mg", "--tp", "2", "--no-progress",
                                      "--max-requeues", "1"))
    log = str(root / "slurm_logs" / f"wb-convert-{job_id}.out")
    def started(run: int) -> bool:
        return os.path.exists(log) and f"workbench: run {run} of job" in read_log(log)

    for run in (1, 2):
        try:
            wait_for(lambda: started(run), 180, f"run {run}")
        except AssertionError as e:
            raise AssertionError(f"{e}\njob: {cluster.job(job_id)}\nlog:\n{read_log(log)}\n{cluster.logs()}") from None
        cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        wait_for(lambda: len(status_lines(root / "slurm_logs", job_id)) == run, 120, f"run {run}'s status line")
    info = cluster.wait(job_id, timeout=60)
    text = read_log(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (info, text)
    lines = status_lines(root / "slurm_logs", job_id)
    assert [line.split()[-1] for line in lines] == ["state=REQUEUED", "state=REQUEUE_LIMIT"], lines
    assert "--max-requeues 1 is used up: not requeued" in text
    assert not glob.glob(str(root / ".mg.*")), os.listdir(root)  # SIGTERM removed the partial output
    proc = launch(cluster, root, "jobs")
    row = next(line for line in proc.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:4] == ["convert", "REQUEUE_LIMIT", "2"], proc.stdout


def test_dry_run_scripts_for_every_job_are_valid_bash(work, tmp_path, monkeypatch, capsys):
    """Each JOB's script (and infer's merge script) as --dry-run prints it: the launch shape its JOB needs, and
    bash -n accepts it. --write keeps the same text."""
    from launch import slurm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    cases = {
        "convert": (["hf", "mg", "--tp", "2"], ["srun --nodes=1 --ntasks=1", "scancel --signal=TERM"]),
        "sft": (["--model", "m", "--data", "d.jsonl", "--output-dir", "runs/sft", "--nodes", "2", "--gpus-per-node",
                 "8"], ["--nproc-per-node 8", '--node-rank "$SLURM_NODEID"', "#SBATCH --gpus-per-node=8",
                        "-m launch.sft", "scancel --signal=USR1",
                        "  --exit-signal-handler\n  --exit-signal SIGUSR1\n"]),
        "pretrain_hf": (["--model", "m", "--data", "d.jsonl", "--output-dir", "runs/pt", "--nodes", "2"],
                        ["--nproc-per-node 1", "-m launch.pretrain_hf"]),
        "infer": (["m", "in.jsonl", "out.jsonl", "--nodes", "4"],
                  ["#SBATCH --nodes=4", "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \"$PYTHON\" -m launch infer",
                   "-m launch infer-merge in.jsonl out.jsonl", "--dependency=afterok"]),
        "pretrain_gpt": (["--seq-length", "8", "--save", "s", "--nodes", "1", "--nproc-per-node", "2",
                          "--max-requeues", "0"], ["#SBATCH --no-requeue", "MAX_REQUEUES=0", "LOAD=()"]),
    }
    for job, (args, needed) in cases.items():
        assert slurm.main(["submit", job, *args, "--dry-run"]) == 0, capsys.readouterr().err
        text = capsys.readouterr().out
        for n in needed:
            assert n in text, (job, n)
        scripts = text.split("\n# ---- merge job")
        assert len(scripts) == (2 if job == "infer" else 1)
        for i, script in enumerate(scripts):
            path = tmp_path / f"{job}{i}.sh"
            path.write_text(script if i == 0 else script.split("\n", 1)[1])
            check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert check.returncode == 0, (job, check.stderr)
        assert slurm.main(["submit", job, *args, "--write", str(tmp_path / f"{job}.sbatch")]) == 0
        capsys.readouterr()
        assert (tmp_path / f"{job}.sbatch").read_text() == scripts[0]
    # The Makefile wrapper prints the same script (its install step taken as done: -o install).
    make = subprocess.run(["make", "-s", "-C", REPO, "-o", "install", "submit", "JOB=convert", "NODES=1", "GPUS=0",
                           f"PYTHON={sys.executable}", "ARGS=hf mg --tp 2 --job-name wb-make", "DRY_RUN=1"],
                          cwd=str(tmp_path), capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert make.returncode == 0, make.stderr
    assert "#SBATCH --job-name=wb-make" in make.stdout and "--tp 2" in make.stdout


def test_sft_saves_on_the_exit_signal_and_resumes_there(tmp_path, capsys):
    """The Trainer scripts' --exit-signal-handler (what the Slurm script passes): SIGUSR1 mid-run writes a
    checkpoint-N at once (N below --save-steps, so only the signal can have saved it), the run ends with exit 0 and
    without a final model; the next run resumes from checkpoint-N and finishes. No Slurm needed: one process."""
    import random
    import signal
    import threading

    from _sft_helpers import build_model, build_tokenizer, chat_record
    from _sft_helpers import write_jsonl as write_sft
    from launch.sft import main

    model = str(tmp_path / "model")
    tok = build_tokenizer(model)
    build_model(model, len(tok), seed=3)
    rng = random.Random(2)
    data = write_sft(str(tmp_path / "train.jsonl"), [chat_record(rng, c) for c in ["code", "math", "chat"] * 4])
    out = str(tmp_path / "run")
    common = ["--model", model, "--data", data, "--output-dir", out, "--max-length", "64", "--batch-size", "1",
              "--save-steps", "1000", "--logging-steps", "1", "--disable_tqdm", "true", "--report-to", "none",
              "--dataloader_pin_memory", "false", "--exit-signal-handler", "--exit-signal", "SIGUSR1"]

    def warn_once_armed():  # as Slurm's warning would: once the handler is in place (before, SIGUSR1 would kill)
        deadline = time.monotonic() + 120
        while signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=warn_once_armed, daemon=True)
    sender.start()
    try:
        assert main(common + ["--max-steps", "400"]) == 0
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    first = capsys.readouterr().out
    stopped = int(re.search(r"step (\d+): received SIGUSR1: saving and exiting", first).group(1))
    assert 0 < stopped < 400, first[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint-%d" % stopped]  # no final model: the run is not finished
    try:
        assert main(common + ["--max-steps", str(stopped + 2)]) == 0
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    second = capsys.readouterr().out
    assert f"resuming from {os.path.join(out, f'checkpoint-{stopped}')}" in second
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, f"checkpoint-{stopped + 2}", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == stopped + 2


def test_without_slurm_the_fixture_fails_with_the_install_line(monkeypatch):
    """No Slurm on PATH: the cluster fixture's reason names the missing programs and the apt-get line (it fails the
    tests with it, never skips them)."""
    from _slurm_cluster import missing_reason

    monkeypatch.setenv("PATH", "/nonexistent")
    why = missing_reason()
    assert why is not None and "munged, slurmctld, slurmd" in why
    assert "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" in why
    c = SlurmCluster()
    try:
        with pytest.raises(ClusterError, match="Slurm is not installed"):
            c.start()
    finally:
        c.stop()
    assert not os.path.exists(c.root)
