"""Start-up cost of the command line against Python's own start, and what each command imports.

    python bench/bench_startup.py [--runs 10] [--work-dir DIR]

Each command runs `--runs` times in a fresh interpreter (as a user runs it). Reported per command: wall time and
CPU time (user + sys of the child: steadier than wall time on a shared machine) as min/median/max, the median
beyond `python -c pass`, and which heavy packages it imported (torch, numpy, torch.distributed.checkpoint,
megatron.core, transformers) and how many family tables. `python -c "import torch"` is measured too: the floor of
any command that reads a torch pickle when it must load tensors. The checkpoints are a tiny random Llama made here
(HF as safetensors and as pytorch_model.bin, legacy, torch_dist).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "numpy", "torch.distributed.checkpoint", "megatron.core", "transformers")
# Runs the CLI in-process after start-up and prints which of HEAVY (and how many family tables) it imported.
PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = ["launch"] + sys.argv[1:]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("launch", run_name="__main__")
    except SystemExit:
        pass
fams = [m for m, mod in list(sys.modules.items())
        if m.startswith("checkpoint_tools.families.") and hasattr(mod, "FAMILY")]
print(json.dumps({"heavy": [m for m in %r if m in sys.modules], "families": len(fams)}), file=sys.stderr)
""" % (HEAVY,)


def make_checkpoints(work: str) -> dict[str, str]:
    sys.path.insert(0, ROOT)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bridge.convert import ConvertOptions, convert

    torch.manual_seed(0)
    hf = os.path.join(work, "hf")
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf)
    legacy, dist = os.path.join(work, "legacy"), os.path.join(work, "torch_dist")
    convert(hf, legacy, ConvertOptions(progress=False))
    convert(hf, dist, ConvertOptions(format="torch_dist", progress=False))
    hf_bin = os.path.join(work, "hf_bin")  # the same weights as one pytorch_model.bin
    os.makedirs(hf_bin)
    shutil.copyfile(os.path.join(hf, "config.json"), os.path.join(hf_bin, "config.json"))
    torch.save(LlamaForCausalLM.from_pretrained(hf).state_dict(), os.path.join(hf_bin, "pytorch_model.bin"))
    return {"hf": hf, "hf_bin": hf_bin, "legacy": legacy, "torch_dist": dist}


def timed(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `runs` fresh runs of argv (output discarded; a failure stops the bench)."""
    walls, cpus = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return walls, cpus


def imports_of(cli_args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, *cli_args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("{")]
    if not line:
        return "?"
    got = json.loads(line[-1])
    return f"{','.join(got['heavy']) or '-'}; {got['families']} family tables"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="fresh runs per command (default 10)")
    p.add_argument("--work-dir", help="where the tiny checkpoints go (default: a temporary folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.work_dir, prefix="bench-startup-") as work:
        ck = make_checkpoints(work)
        out = os.path.join(work, "out")
        py = sys.executable
        cases = [
            ("python -c pass", [py, "-c", "pass"], None),
            ("python -c 'import torch'", [py, "-c", "import torch"], None),
            ("launch --help", [py, "-m", "launch", "--help"], ["--help"]),
            ("launch convert --help", [py, "-m", "launch", "convert", "--help"], ["convert", "--help"]),
            *((f"launch inspect {k}", [py, "-m", "launch", "inspect", ck[k]], ["inspect", ck[k]])
              for k in ("hf", "hf_bin", "legacy", "torch_dist")),
            ("launch convert hf->legacy --dry-run", [py, "-m", "launch", "convert", ck["hf"], out, "--dry-run"],
             ["convert", ck["hf"], out, "--dry-run"]),
        ]
        load = os.getloadavg()[0]
        print(f"{a.runs} runs each; load average {load:.1f} on {os.cpu_count()} cores; seconds min/median/max")
        print(f"{'command':38} {'wall':>20} {'cpu':>20} {'wall-pass':>10} {'cpu-pass':>9}  imports")
        base = None
        for name, cmd, probe in cases:
            walls, cpus = timed(cmd, a.runs)
            mw, mc = statistics.median(walls), statistics.median(cpus)
            if base is None:
                base = (mw, mc)
            span = lambda v: f"{min(v):.3f}/{statistics.median(v):.3f}/{max(v):.3f}"  # noqa: E731
            what = imports_of(probe) if probe else "-"
            print(f"{name:38} {span(walls):>20} {span(cpus):>20} {mw - base[0]:>+10.3f} {mc - base[1]:>+9.3f}  "
                  f"{what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
