"""Conversion speed and memory on real Llama shapes, against the I/O floor of copying the same bytes with `cp`.

    python bench/bench_convert.py --sizes 1b,3b,7b --tp 2 --pp 1 [--work-dir DIR] [--keep]

For each size it writes a random bf16 checkpoint of that shape (streamed, never whole in memory), then times
`cp -r` of it, HF -> Megatron and Megatron -> HF through the project CLI in a subprocess, sampling the converter's
resident memory (anonymous = what the converter holds; file = mapped checkpoint pages the kernel may drop).
Targets: conversion <= 1.5x cp; peak anonymous RSS <= one output rank's shard + 1 GB, flat in model size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint_tools.canonical import CanonicalConfig, expected_shapes, expected_tensor_names  # noqa: E402
from checkpoint_tools.families import get_family  # noqa: E402
from checkpoint_tools.safetensors_io import ShardedSafetensorsWriter, TensorSpec  # noqa: E402

SHAPES = {  # public Llama shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
GB = 1024**3


def write_random_checkpoint(path: str, size: str) -> int:
    s = SHAPES[size]
    cfg = CanonicalConfig(head_dim=s["hidden_size"] // s["num_attention_heads"], dtype="bfloat16",
                          max_position_embeddings=4096, rms_norm_eps=1e-5, **s)
    fam = get_family("llama")
    shapes = expected_shapes(cfg)
    names = expected_tensor_names(cfg)
    specs = [TensorSpec(n, shapes[n], torch.bfloat16) for n in names]
    os.makedirs(path)
    w = ShardedSafetensorsWriter(path, specs, max_shard_bytes=5 * GB)
    for spec in specs:
        w.write(spec.name, torch.empty(spec.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05))
    w.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fam.config_from_canonical(cfg), f, indent=2)
    return sum(sp.nbytes for sp in specs)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return anon, file


def timed(cmd: list[str]) -> dict:
    """Run `cmd` after flushing dirty pages (so no run pays for the previous one's writeback); return wall seconds
    and peak anonymous / file-backed RSS of the process."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            a, f = _rss(proc.pid)
            peak[0], peak[1] = max(peak[0], a), max(peak[1], f)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{err[-2000:]}")
    os.sync()  # until the bytes are on disk: page-cache speed differs wildly between one big write and many small
    durable = time.perf_counter() - t0
    return {"seconds": wall, "durable_seconds": durable, "peak_anon_gb": peak[0] / GB, "peak_file_gb": peak[1] / GB}


USERSPACE_COPY = (
    "import os, sys\n"
    "src, dst = sys.argv[1], sys.argv[2]\n"
    "for d, _, files in os.walk(src):\n"
    "    out = os.path.join(dst, os.path.relpath(d, src)); os.makedirs(out, exist_ok=True)\n"
    "    for f in files:\n"
    "        with open(os.path.join(d, f), 'rb') as a, open(os.path.join(out, f), 'wb') as b:\n"
    "            while chunk := a.read(64 << 20): b.write(chunk)\n")


def copies(src: str, dst: str) -> dict:
    """The two floors: `cp -r` (in-kernel copy_file_range here) and a plain read/write copy through user space,
    which is what any converter must do at least."""
    kernel = timed(["cp", "-r", src, dst])
    shutil.rmtree(dst)
    user = timed([sys.executable, "-c", USERSPACE_COPY, src, dst])
    shutil.rmtree(dst)
    return {"cp": kernel, "user": user}


def bench_size(size: str, work: str, tp: int, pp: int) -> dict:
    hf, cp_dst, mg, back = (os.path.join(work, f"{size}_{n}") for n in ("hf", "cp", "mg", "back"))
    for p in (hf, cp_dst, mg, back):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_random_checkpoint(hf, size)
    gen = time.perf_counter() - t0
    cli = [sys.executable, "-m", "launch", "convert", "--no-progress"]
    floor_hf = copies(hf, cp_dst)
    cp, ucp = floor_hf["cp"], floor_hf["user"]
    to_mg = timed(cli + [hf, mg, "--tp", str(tp), "--pp", str(pp)])
    floor_mg = copies(mg, cp_dst)
    cp_mg, ucp_mg = floor_mg["cp"], floor_mg["user"]
    to_hf = timed(cli + [mg, back])
    rank_shard = max(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(mg) for f in fs
                     if f == "model_optim_rng.pt")
    row = {"size": size, "params_gb": nbytes / GB, "tp": tp, "pp": pp, "generate_s": gen,
           "cp_hf_s": cp["seconds"], "hf_to_megatron_s": to_mg["seconds"],
           "hf_to_megatron_vs_cp": to_mg["seconds"] / cp["seconds"],
           "cp_hf_durable_s": cp["durable_seconds"], "hf_to_megatron_durable_s": to_mg["durable_seconds"],
           "hf_to_megatron_durable_vs_cp": to_mg["durable_seconds"] / cp["durable_seconds"],
           "cp_megatron_durable_s": cp_mg["durable_seconds"], "megatron_to_hf_durable_s": to_hf["durable_seconds"],
           "megatron_to_hf_durable_vs_cp": to_hf["durable_seconds"] / cp_mg["durable_seconds"],
           "user_copy_hf_durable_s": ucp["durable_seconds"], "user_copy_megatron_durable_s": ucp_mg["durable_seconds"],
           "hf_to_megatron_durable_vs_user_copy": to_mg["durable_seconds"] / ucp["durable_seconds"],
           "megatron_to_hf_durable_vs_user_copy": to_hf["durable_seconds"] / ucp_mg["durable_seconds"],
           "hf_to_megatron_peak_anon_gb": to_mg["peak_anon_gb"], "hf_to_megatron_peak_file_gb": to_mg["peak_file_gb"],
           "cp_megatron_s": cp_mg["seconds"], "megatron_to_hf_s": to_hf["seconds"],
           "megatron_to_hf_vs_cp": to_hf["seconds"] / cp_mg["seconds"],
           "megatron_to_hf_peak_anon_gb": to_hf["peak_anon_gb"], "megatron_to_hf_peak_file_gb": to_hf["peak_file_gb"],
           "largest_rank_shard_gb": rank_shard / GB}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1b", help="comma-separated of " + ",".join(SHAPES))
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--work-dir", help="scratch folder (default: a temporary one); needs ~4x the model size free")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    work = a.work_dir or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for size in a.sizes.split(","):
            row = bench_size(size.strip(), work, a.tp, a.pp)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not a.keep:
                for n in ("hf", "mg", "back"):
                    shutil.rmtree(os.path.join(work, f"{size}_{n}"), ignore_errors=True)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\nTimes include sync (bytes on disk). x cp: ratio to `cp -r`; x copy: ratio to a read/write copy through "
          "user space.\nanon: peak anonymous RSS of the converter; file: peak mapped checkpoint pages (reclaimable).")
    print(f"{'size':>4} {'GB':>6} | {'HF->Mg s':>8} {'x cp':>5} {'x copy':>6} {'anon GB':>7} {'file GB':>7} | "
          f"{'Mg->HF s':>8} {'x cp':>5} {'x copy':>6} {'anon GB':>7} {'file GB':>7} | {'rank shard GB':>13}")
    for r in rows:
        print(f"{r['size']:>4} {r['params_gb']:6.2f} | {r['hf_to_megatron_durable_s']:8.1f} "
              f"{r['hf_to_megatron_durable_vs_cp']:5.2f} {r['hf_to_megatron_durable_vs_user_copy']:6.2f} "
              f"{r['hf_to_megatron_peak_anon_gb']:7.2f} {r['hf_to_megatron_peak_file_gb']:7.2f} | "
              f"{r['megatron_to_hf_durable_s']:8.1f} {r['megatron_to_hf_durable_vs_cp']:5.2f} "
              f"{r['megatron_to_hf_durable_vs_user_copy']:6.2f} {r['megatron_to_hf_peak_anon_gb']:7.2f} "
              f"{r['megatron_to_hf_peak_file_gb']:7.2f} | {r['largest_rank_shard_gb']:13.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
