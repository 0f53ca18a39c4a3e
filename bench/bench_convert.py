"""Conversion speed and memory on real Llama shapes, against the I/O floor of copying the same bytes.

    python bench/bench_convert.py --sizes 1b,3b,7b --tp 2 --pp 1 --runs 5 [--work-dir DIR] [--keep]
    python bench/bench_convert.py --sizes 70b --layers 2 --runs 5      # a 70B shape's tensors, 2 layers

For each size it writes a random bf16 Hugging Face checkpoint of that shape (streamed, never whole in memory) and
runs every direction through the project CLI in a subprocess, `--runs` times each:

    bin_to_legacy     HF `pytorch_model-0000N-of-0000M.bin` shards + index (written by torch.save) -> legacy TPxPP
    hf_to_legacy      HF safetensors -> legacy TPxPP
    legacy_to_hf      legacy TPxPP -> HF safetensors
    legacy_to_legacy  legacy TPxPP -> legacy at --reshard (default TP1 PP2): merge and split again
    hf_to_torch_dist  HF safetensors -> torch_dist TPxPP
    torch_dist_to_hf  torch_dist -> HF safetensors

Each is compared with two floors on its source folder: `cp -r` (an in-kernel copy_file_range here, which a
converter whose bytes pass through user space cannot use; a reference, `--runs` times per source) and a read/write
copy through user space with 64 MB buffers (what any converter must do at least; the bar is 1.2x of it). Every
conversion run is paired with a run of that copy, back to back (the order alternating), and `x copy` is the median
of the pairs' ratios, its range printed beside it: run times on a VM drift by 2x within minutes, and a pair shares
the conditions. Every timing runs until the bytes are on disk (`sync` after) and, when the bench may (root), starts
from a cold page cache (`sync; echo 3 > /proc/sys/vm/drop_caches` before every run, copies and conversions alike);
otherwise every run is preceded by a sync only and the header says so. Peak memory is summed over the whole process
tree the command starts (the CLI and every worker it spawns), sampled from /proc every 20 ms: anonymous (what the
converter holds) and file-backed (mapped checkpoint pages the kernel may drop) reported apart. Times are
min/median/max of the runs; memory is the largest peak of the runs. The load average is printed with each size: the
machine may be shared.
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
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint_tools.canonical import CanonicalConfig, expected_shapes, expected_tensor_names  # noqa: E402
from checkpoint_tools.families import get_family  # noqa: E402
from checkpoint_tools.safetensors_io import SafetensorsDir, ShardedSafetensorsWriter, TensorSpec, plan_shards  # noqa: E402,E501

SHAPES = {  # public Llama shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
DIRECTIONS = ("bin_to_legacy", "hf_to_legacy", "legacy_to_hf", "legacy_to_legacy", "hf_to_torch_dist", "torch_dist_to_hf")
SOURCE_OF = {"bin_to_legacy": "bin", "hf_to_legacy": "hf", "legacy_to_hf": "legacy", "legacy_to_legacy": "legacy",
             "hf_to_torch_dist": "hf", "torch_dist_to_hf": "dist"}
# Directions run in this order, and each source is built from the first of its origins on disk, so the model is
# on disk at most three times (source, next source or output, copy): HF -> .bin -> legacy -> torch_dist.
RUN_ORDER = ("hf_to_legacy", "hf_to_torch_dist", "bin_to_legacy", "legacy_to_hf", "legacy_to_legacy",
             "torch_dist_to_hf")
BUILT_FROM = {"bin": ("hf",), "legacy": ("bin", "hf"), "dist": ("legacy", "hf", "bin")}
GB = 1024**3
DROP_CACHES = "/proc/sys/vm/drop_caches"


# ---------------------------------------------------------------------------------------------- checkpoints


def shape_of(size: str, layers: int | None) -> dict:
    s = dict(SHAPES[size])
    if layers:
        s["num_layers"] = layers
    return s


def write_random_checkpoint(path: str, shape: dict) -> int:
    """A random bf16 HF Llama checkpoint of `shape`, one tensor in memory at a time; returns its tensor bytes."""
    cfg = CanonicalConfig(head_dim=shape["hidden_size"] // shape["num_attention_heads"], dtype="bfloat16",
                          max_position_embeddings=4096, rms_norm_eps=1e-5, **shape)
    fam = get_family("llama")
    shapes = expected_shapes(cfg)
    specs = [TensorSpec(n, shapes[n], torch.bfloat16) for n in expected_tensor_names(cfg)]
    os.makedirs(path)
    w = ShardedSafetensorsWriter(path, specs, max_shard_bytes=5 * GB)
    for spec in specs:
        w.write(spec.name, torch.empty(spec.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05))
    w.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fam.config_from_canonical(cfg), f, indent=2)
    return sum(sp.nbytes for sp in specs)


def write_bin_checkpoint(hf: str, path: str, max_shard_bytes: int = 2 * GB) -> None:
    """The same tensors as `pytorch_model-0000N-of-0000M.bin` shards + `pytorch_model.bin.index.json`, as older
    `save_pretrained` wrote them with torch.save (one shard in memory at a time)."""
    src = SafetensorsDir(hf)
    shards = plan_shards([src.spec(n) for n in src.names()], max_shard_bytes)
    os.makedirs(path)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fn = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({s.name: src.get(s.name).clone() for s in shard}, os.path.join(path, fn))
        for s in shard:
            weight_map[s.name] = fn
            total += s.nbytes
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    shutil.copy(os.path.join(hf, "config.json"), path)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def largest_file(path: str) -> int:
    return max((os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs), default=0)


# ---------------------------------------------------------------------------------------------- measuring


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from the kernel's per-thread child lists (cheap enough to run every 20 ms:
    scanning all of /proc instead took a few ms of the CPU the conversion competes for)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _tree_rss(root: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes summed over `root` and all its descendants."""
    anon = file = 0
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("RssFile:"):
                        file += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file


def timed(cmd: list[str], cold: bool) -> dict:
    """Run `cmd` from a flushed (and, when `cold`, dropped) page cache until its bytes are on disk; wall seconds and
    peak anonymous / file-backed RSS summed over its process tree."""
    os.sync()
    if cold:
        with open(DROP_CACHES, "w") as f:
            f.write("3")
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            a, f = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], a), max(peak[1], f)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-2000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: each process waited for its children
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    os.sync()  # until the bytes are on disk: page-cache speed differs wildly between one big write and many small
    return {"seconds": time.perf_counter() - t0, "cpu": cpu, "anon": peak[0], "file": peak[1]}


USERSPACE_COPY = (
    "import os, sys\n"
    "src, dst = sys.argv[1], sys.argv[2]\n"
    "for d, _, files in os.walk(src):\n"
    "    out = os.path.join(dst, os.path.relpath(d, src)); os.makedirs(out, exist_ok=True)\n"
    "    for f in files:\n"
    "        with open(os.path.join(d, f), 'rb', buffering=0) as a, open(os.path.join(out, f), 'wb', buffering=0) as b:\n"
    "            buf = bytearray(64 << 20); view = memoryview(buf)\n"
    "            while n := a.readinto(buf):\n"
    "                done = 0\n"
    "                while done < n: done += b.write(view[done:n])\n")


def repeat(runs: int, make_cmd, cleanup, cold: bool) -> list[dict]:
    out = []
    for _ in range(runs):
        out.append(timed(make_cmd(), cold))
        cleanup()
    return out


def summary(samples: list[dict]) -> dict:
    secs = [s["seconds"] for s in samples]
    return {"min_s": min(secs), "median_s": statistics.median(secs), "max_s": max(secs),
            "cpu_median_s": statistics.median(s["cpu"] for s in samples),
            "peak_anon_gb": max(s["anon"] for s in samples) / GB, "peak_file_gb": max(s["file"] for s in samples) / GB}


def startup_seconds(runs: int) -> float:
    """Median wall time of starting Python and importing the converter (torch included), warm: the fixed cost in
    every conversion time, the same at 1B and at 70B."""
    secs = []
    for _ in range(max(runs, 3)):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import megatron_bridge.convert"], cwd=ROOT, check=True)
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def cp_floor(src: str, dst: str, runs: int, cold: bool) -> dict:
    """`cp -r` of `src`, `runs` times (a reference only: no converter can use its in-kernel copy)."""
    return summary(repeat(runs, lambda: ["cp", "-r", src, dst], lambda: shutil.rmtree(dst, ignore_errors=True), cold))


def paired_runs(runs: int, convert, copy, cleanup) -> tuple[list[dict], list[dict]]:
    """`runs` pairs of (conversion, user-space copy of its source) run back to back, the order alternating, so that
    each ratio compares two runs under the same conditions. Run times here drift by 2x within minutes: a VM whose
    freed memory goes back to the host (virtio-balloon free page reporting; drop_caches frees gigabytes) pays the
    host again for every page it touches, in the copy as in the conversion."""
    make = {"convert": convert, "copy": copy}
    samples: dict[str, list[dict]] = {"convert": [], "copy": []}
    for i in range(runs):
        for kind in (("convert", "copy") if i % 2 == 0 else ("copy", "convert")):
            samples[kind].append(timed(*make[kind]()))
            cleanup(kind)
    return samples["convert"], samples["copy"]


# ---------------------------------------------------------------------------------------------- the bench


def convert_cmd(src: str, dst: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "launch", "convert", "--no-progress", src, dst, *flags]


def bench_size(size: str, a: argparse.Namespace, work: str, cold: bool) -> list[dict]:
    shape = shape_of(size, a.layers)
    label = size + (f"/L{a.layers}" if a.layers else "")
    path = {n: os.path.join(work, f"{size}_{n}") for n in ("hf", "bin", "legacy", "dist", "out", "copy")}
    for p in path.values():
        shutil.rmtree(p, ignore_errors=True)
    layout = ["--tp", str(a.tp), "--pp", str(a.pp)]
    rtp, rpp = (int(x) for x in a.reshard.split(","))
    flags = {"bin_to_legacy": layout, "hf_to_legacy": layout, "legacy_to_hf": [],
             "legacy_to_legacy": ["--tp", str(rtp), "--pp", str(rpp)],
             "hf_to_torch_dist": layout + ["--format", "torch_dist"], "torch_dist_to_hf": []}
    wanted = [d for d in RUN_ORDER if d in a.directions.split(",")]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    nbytes = write_random_checkpoint(path["hf"], shape)
    print(f"# {label}: wrote {nbytes / GB:.2f} GB of tensors in {time.perf_counter() - t0:.0f} s", flush=True)
    cp_cache: dict[str, dict] = {}
    rows = []

    def need(source: str) -> None:
        """Make the source folder a direction reads (once), from the folder built last (the same weights)."""
        if os.path.isdir(path[source]):
            return
        origin = next(o for o in BUILT_FROM[source] if os.path.isdir(path[o]))
        if source == "bin":
            write_bin_checkpoint(path["hf"], path["bin"])
        else:
            extra = ([] if origin == "legacy" else layout) + (["--format", "torch_dist"] if source == "dist" else [])
            subprocess.run(convert_cmd(path[origin], path[source], *extra), check=True)

    def free_unneeded(later: list[str]) -> None:
        """Delete the checkpoints no later direction reads or builds from, so that at most a source, the one
        built from it and the output or copy are on disk at once (7B: 3 x 13.5 GB)."""
        if a.keep:
            return
        keep = {SOURCE_OF[d] for d in later}
        for s in [SOURCE_OF[d] for d in later]:
            if not os.path.isdir(path[s]):  # still to build: keep the first existing folder it is built from
                keep.add(next((o for o in BUILT_FROM[s] if os.path.isdir(path[o])), s))
        for s in ("hf", "bin", "legacy", "dist"):
            if s not in keep:
                shutil.rmtree(path[s], ignore_errors=True)

    for i, direction in enumerate(wanted):
        source = SOURCE_OF[direction]
        row = {"size": label, "direction": direction, "params_gb": nbytes / GB, "runs": a.runs}
        try:
            need(source)
            free_unneeded(wanted[i:])
            if source not in cp_cache:
                cp_cache[source] = cp_floor(path[source], path["copy"], a.runs, cold)

            def cleanup(kind: str) -> None:
                if kind == "convert":
                    row["out_gb"] = dir_bytes(path["out"]) / GB
                    row["largest_out_file_gb"] = largest_file(path["out"]) / GB
                shutil.rmtree(path["out" if kind == "convert" else "copy"], ignore_errors=True)

            conversions, copies = paired_runs(
                a.runs, lambda: (convert_cmd(path[source], path["out"], *flags[direction]), cold),
                lambda: ([sys.executable, "-c", USERSPACE_COPY, path[source], path["copy"]], cold), cleanup)
            row.update(summary(conversions))
            uc = summary(copies)
            ratios = [c["seconds"] / f["seconds"] for c, f in zip(conversions, copies)]
            row.update(source_gb=dir_bytes(path[source]) / GB, cp_median_s=cp_cache[source]["median_s"],
                       user_copy_median_s=uc["median_s"], user_copy_min_s=uc["min_s"], user_copy_max_s=uc["max_s"],
                       user_copy_cpu_s=uc["cpu_median_s"], x_cp=row["median_s"] / cp_cache[source]["median_s"],
                       x_copy=statistics.median(ratios), x_copy_min=min(ratios), x_copy_max=max(ratios),
                       x_copy_of_medians=row["median_s"] / uc["median_s"],
                       x_copy_cpu=statistics.median(c["cpu"] / f["cpu"] for c, f in zip(conversions, copies)))
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            row["error"] = str(e).strip().splitlines()[-1][:200]
            shutil.rmtree(path["out"], ignore_errors=True)
        row["load_avg_start"], row["load_avg_end"] = load0[0], os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        free_unneeded(wanted[i + 1:])
    if not a.keep:
        for p in path.values():
            shutil.rmtree(p, ignore_errors=True)
    return rows


def print_table(rows: list[dict], runs: int, tp: int, pp: int, reshard: str, cold: bool, startup: float) -> None:
    print(f"\nstart-up (Python + torch + converter imports, warm, included in every conversion time): {startup:.1f} s")
    print(f"{runs} runs each, TP={tp} PP={pp} (legacy_to_legacy to TP,PP={reshard}); "
          f"{'cold page cache before every run (drop_caches)' if cold else 'warm page cache (no permission to drop it)'}"
          f"; times until the bytes are on disk (sync).\nx copy: median over the runs of the conversion's time over "
          f"the user-space read+write copy of its source run beside it (range: min-max of those ratios); copy s: the "
          f"copies' median; x cp: median time over the median of `cp -r`; cpu: CPU seconds (user+sys) of the process "
          f"tree, x cpu: the pairs' median ratio; anon/file: peak RSS summed over the process tree; out GB: all files "
          f"written (more than the source where Megatron keeps a tied embedding on two stages).")
    print(f"{'size':>7} {'GB':>6} {'direction':>16} | {'min s':>6} {'med s':>6} {'max s':>6} | {'copy s':>6} "
          f"{'x cp':>5} {'x copy':>6} {'range':>9} | {'cpu s':>6} {'x cpu':>5} | {'anon GB':>7} {'file GB':>7} | "
          f"{'out GB':>6} {'largest':>7} | load")
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['size']:>7} {r['params_gb']:6.2f} {r['direction']:>16} | failed: {r['error']}")
            continue
        print(f"{r['size']:>7} {r['params_gb']:6.2f} {r['direction']:>16} | {r['min_s']:6.1f} {r['median_s']:6.1f} "
              f"{r['max_s']:6.1f} | {r['user_copy_median_s']:6.1f} {r['x_cp']:5.2f} {r['x_copy']:6.2f} "
              f"{r['x_copy_min']:4.2f}-{r['x_copy_max']:4.2f} | "
              f"{r.get('cpu_median_s', nan):6.1f} {r.get('x_copy_cpu', nan):5.2f} | {r['peak_anon_gb']:7.2f} "
              f"{r['peak_file_gb']:7.2f} | {r['out_gb']:6.2f} {r['largest_out_file_gb']:7.2f} | "
              f"{r.get('load_avg_start', nan):.1f}-{r.get('load_avg_end', nan):.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1b", help="comma-separated of " + ",".join(SHAPES))
    p.add_argument("--layers", type=int, help="keep the shape's tensors but only this many layers (e.g. 70b with 2)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--reshard", default="1,2", help="TP,PP of the legacy_to_legacy output (default 1,2)")
    p.add_argument("--directions", default=",".join(DIRECTIONS), help="comma-separated of " + ",".join(DIRECTIONS))
    p.add_argument("--runs", type=int, default=5, help="paired runs per direction (medians reported)")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache between runs")
    p.add_argument("--work-dir", help="scratch folder (default: a temporary one); needs ~3x the model size free")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    unknown = set(a.directions.split(",")) - set(DIRECTIONS)
    if unknown:
        p.error(f"unknown directions {sorted(unknown)}; use {','.join(DIRECTIONS)}")
    cold = not a.warm and can_drop_caches()
    work = a.work_dir or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(work, exist_ok=True)
    rows: list[dict] = []
    startup = startup_seconds(a.runs)
    print(f"# start-up (Python + torch + converter imports): {startup:.2f} s", flush=True)
    try:
        for size in a.sizes.split(","):
            rows += bench_size(size.strip(), a, work, cold)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, a.runs, a.tp, a.pp, a.reshard, cold, startup)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"startup_s": startup, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
