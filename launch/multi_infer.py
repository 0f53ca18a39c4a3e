"""Multi-replica inference that survives the night: K model replicas over a node's devices, a large JSONL pushed
through them, and an ordered, complete output in the morning whatever crashed in between.

    infer(model, data, output, num_workers, devices=None, backend="hf", **generation)
    python -m launch infer MODEL DATA OUT --num-workers K [--devices 0,1,2,3] [--backend hf|vllm] ...
    python -m launch infer-merge DATA OUT      (many nodes: join every node's part files into one ordered output)

How it holds together (files: see launch/infer_store.py):
- Placement: K replicas, each a contiguous block of N/K devices, placed by the model's `set_device(block)` or a
  `device_map` over the block (launch/infer_backends.py); the parent's CUDA_VISIBLE_DEVICES is never edited. No GPU:
  K workers on the CPU, the cores shared between them.
- Work is handed out dynamically: pending items, sorted by length, cut into small chunks; a worker that finishes one
  gets the next, so a fast replica takes more and a slow one never holds the run.
- Nothing is lost: each worker appends each finished item to its own part file and flushes; a re-run with the same
  output path skips finished items (keyed by id + prompt + generation settings); a dead worker's unfinished items
  go back to the queue, each alone (so the next death names its culprit), and an item that killed its worker more
  than --max-retries times is set aside and reported; the output is merged by index and written atomically.
- Malformed input lines are reported with their line numbers before any model loads; the rest runs (an overnight
  run is not lost to one bad line), each gets an error row in the output, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Optional, Sequence

from launch.infer_backends import BACKENDS, backend_available, install_hint
from launch.infer_items import DEFAULTS, Item, check_settings, node_slice, normalized, read_input
from launch.infer_store import (MergeResult, PartWriter, check_output_path, coordinator_file, merge,
                                open_parts, parts_dir, read_manifest, read_part, read_records)
from launch.infer_worker import FAULT_ENV, parse_fault, worker_main

log = logging.getLogger(__name__)
IDLE_DEATHS_ALLOWED = 3  # a replica that keeps dying with no item in hand is retired, not restarted forever


# ---------------------------------------------------------------------------------------------------------------
# Checks before any model loads
# ---------------------------------------------------------------------------------------------------------------

def parse_devices(devices) -> Optional[list[str]]:
    """'0,1,2,3' / [0, 1] / ['cuda:0'] / 'cpu' -> device names; None means every visible GPU, else the CPU."""
    if devices is None or devices == "":
        return None
    parts = devices.split(",") if isinstance(devices, str) else list(devices)
    out = []
    for d in parts:
        d = str(d).strip()
        if d == "cpu":
            out.append("cpu")
        elif d.isdigit():
            out.append(f"cuda:{d}")
        elif d.startswith("cuda:") and d[5:].isdigit():
            out.append(d)
        else:
            raise ValueError(f"--devices {devices!r}: {d!r} is not a GPU index; use e.g. --devices 0,1,2,3 (or cpu)")
    if "cpu" in out and len(out) > 1:
        raise ValueError(f"--devices {devices!r}: 'cpu' cannot be mixed with GPUs")
    if len(set(out)) != len(out):
        raise ValueError(f"--devices {devices!r}: a device is listed twice")
    return out


def device_blocks(devices, num_workers: int) -> list[list[str]]:
    """One contiguous block of N/K devices per replica; on the CPU every replica gets 'cpu'."""
    import torch

    if num_workers < 1:
        raise ValueError(f"--num-workers {num_workers}: need at least 1")
    names = parse_devices(devices)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if names is None:
        names = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if names == ["cpu"]:
        return [["cpu"] for _ in range(num_workers)]
    missing = [d for d in names if int(d.split(":")[1]) >= count]
    if missing:
        raise ValueError(f"--devices: {missing} not available (this machine has {count} CUDA device(s)); "
                         f"leave --devices out to use what is visible")
    return split_blocks(names, num_workers)


def split_blocks(names: list[str], num_workers: int) -> list[list[str]]:
    """K contiguous blocks of N/K devices (8 GPUs: 8/4/2/1 replicas of 1/2/4/8 GPUs)."""
    if len(names) % num_workers:
        ok = [k for k in range(1, len(names) + 1) if len(names) % k == 0]
        raise ValueError(f"--num-workers {num_workers} does not divide the {len(names)} devices {names}; "
                         f"use one of {ok}")
    size = len(names) // num_workers
    return [names[i * size:(i + 1) * size] for i in range(num_workers)]


def node_placement(nodes: Optional[int], node_rank: Optional[int]) -> tuple[int, int]:
    """--nodes/--node-rank, else Slurm's task count and rank (one task per node), else a single node."""
    if nodes is None and node_rank is None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        nodes, node_rank = int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_PROCID", "0"))
    nodes, node_rank = nodes or 1, node_rank or 0
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"--node-rank {node_rank} with --nodes {nodes}: the rank must be in 0..{nodes - 1}")
    return nodes, node_rank


def model_format(model_path: str) -> str:
    """'hf' or 'megatron', without importing either side's heavy code."""
    if not os.path.exists(model_path):
        raise ValueError(f"model {model_path}: not found; give a Hugging Face folder or a Megatron checkpoint")
    if not os.path.isdir(model_path):
        raise ValueError(f"model {model_path}: is a file; give the checkpoint folder")
    if os.path.isfile(os.path.join(model_path, "latest_checkpointed_iteration.txt")):
        return "megatron"
    if os.path.isfile(os.path.join(model_path, "config.json")):
        return "hf"
    raise ValueError(f"model {model_path}: neither a Hugging Face folder (config.json) nor a Megatron checkpoint "
                     f"(latest_checkpointed_iteration.txt)")


def check_data(data_path: str) -> None:
    if not os.path.exists(data_path):
        raise ValueError(f"data {data_path}: not found; give a JSONL file with one {{\"prompt\": ...}} or "
                         f"{{\"messages\": [...]}} object a line")
    if not os.path.isfile(data_path):
        raise ValueError(f"data {data_path}: not a file; give a JSONL file")


# ---------------------------------------------------------------------------------------------------------------
# The model folder the workers load: as given, or converted once into a cache beside the output
# ---------------------------------------------------------------------------------------------------------------

def _signature(path: str) -> list:
    """What identifies a source checkpoint's contents cheaply: every file's relative path, size and mtime."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return out


def _cached(src: str, cache: str, convert) -> str:
    """`convert(src, cache)` once; reused while the source's files are unchanged (a marker written after)."""
    marker = os.path.join(cache, "workbench_source.json")
    want = {"source": os.path.abspath(src), "files": _signature(src)}
    try:
        with open(marker) as f:
            if json.load(f) == want:
                return cache
    except (OSError, json.JSONDecodeError):
        pass
    convert(src, cache)
    with open(marker, "w") as f:
        json.dump(want, f)
    return cache


def needs_llama(model_dir: str, backend: str) -> bool:
    """A family with no `transformers` class (InternLM2, Baichuan2, ...) runs as the Llama its table converts it to;
    so does our own modeling file's checkpoint under vLLM, which does not know it."""
    from transformers import AutoConfig

    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "workbench":
        import checkpoint_tools.modeling_workbench  # noqa: F401  registers the Auto classes
        return backend == "vllm"
    try:
        AutoConfig.from_pretrained(model_dir)
        return False
    except (ValueError, KeyError, OSError):
        return True


def resolve_model(model_path: str, output: str, backend: str, progress: bool) -> str:
    """The Hugging Face folder the replicas load: `model_path` itself, or a conversion cached at OUT.model*."""
    src = model_path
    if model_format(model_path) == "megatron":
        from megatron_bridge.convert import ConvertOptions, make_plan, run_plan

        def megatron_to_hf(s, dst):
            opts = ConvertOptions(force=True, progress=progress)
            run_plan(make_plan(s, opts), s, dst, opts)

        src = _cached(src, os.path.abspath(output) + ".model", megatron_to_hf)
    if needs_llama(src, backend):
        from checkpoint_tools.family_convert import convert_family

        src = _cached(src, os.path.abspath(output) + ".model-llama",
                      lambda s, dst: convert_family(s, dst, "llama", force=True, progress=progress))
    return src


def check_tokenizer(model_dir: str, items: list[Item]) -> None:
    """A missing tokenizer or chat template is found here, not by every worker after its model loaded."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"model {model_dir}: no usable tokenizer ({str(e).splitlines()[0]}); copy the tokenizer "
                         f"files into the folder") from None
    chats = [it for it in items if it.messages is not None]
    if chats and not tok.chat_template:
        raise ValueError(f"model {model_dir}: the tokenizer has no chat template, but {len(chats)} line(s) use "
                         f"`messages` (first: line {chats[0].index + 1}); give `prompt` text or a model with one")


# ---------------------------------------------------------------------------------------------------------------
# The coordinator
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Replica:
    slot: int
    devices: list[str]
    proc: object = None
    conn: object = None
    pid: Optional[int] = None
    part: Optional[str] = None
    loaded: bool = False            # this incarnation reached "ready"
    ever_loaded: bool = False
    chunk: Optional[tuple] = None   # (chunk id, [Item]) in hand
    idle_deaths: int = 0
    retired: Optional[str] = None   # why it was given up
    fatal: Optional[str] = None     # the load error it reported


@dataclass
class RunReport:
    output: Optional[str]
    total: int = 0                  # items in this node's slice
    skipped: int = 0                # finished by an earlier run
    done: int = 0                   # finished now
    tokens: int = 0
    wall_s: float = 0.0
    load_s: Optional[float] = None  # until the first replica was ready
    per_worker: dict = field(default_factory=dict)
    deaths: int = 0                 # worker processes that died
    retried: int = 0                # items handed out again after a death
    failed: list = field(default_factory=list)      # (id, why): set aside, generate errors, malformed lines
    missing: list = field(default_factory=list)     # ids of other nodes still to do (many nodes)
    nodes: int = 1
    node_rank: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing and self.output is not None

    def summary(self) -> str:
        w = self.wall_s
        rate = f"{self.done / w:.2f} items/s, {self.tokens / w:.1f} tokens/s" if w else "-"
        gen_s = self.wall_s - (self.load_s or 0.0)
        if self.load_s is not None and gen_s > 0:
            rate += (f" (after {self.load_s:.1f} s loading: {self.done / gen_s:.2f} items/s, "
                     f"{self.tokens / gen_s:.1f} tokens/s)")
        lines = [f"infer: {self.done} item(s) generated, {self.skipped} already done, {len(self.failed)} failed, "
                 f"of {self.total}" + (f" (node {self.node_rank} of {self.nodes})" if self.nodes > 1 else ""),
                 f"  {self.tokens} tokens in {self.wall_s:.1f} s: {rate}",
                 f"  per worker: {dict(sorted(self.per_worker.items()))}; worker deaths: {self.deaths}; "
                 f"items retried: {self.retried}"]
        for item_id, why in self.failed[:20]:
            lines.append(f"  FAILED id={item_id!r}: {why}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failed")
        if self.output:
            lines.append(f"  wrote {self.output}")
        elif self.missing:
            lines.append(f"  {len(self.missing)} item(s) of other nodes not done yet; when every node has finished: "
                         f"python -m launch infer-merge DATA OUT")
        return "\n".join(lines)


class Coordinator:
    """Hands chunks to replicas over one pipe each, notices deaths, re-hands what a dead replica had not finished."""

    def __init__(self, items: list[Item], blocks: list[list[str]], spec: dict, chunk_size: int, max_retries: int,
                 parts: str, node: int, progress: bool):
        self.spec, self.parts, self.node, self.max_retries = spec, parts, node, max_retries
        order = sorted(items, key=lambda it: (json.dumps(it.settings, sort_keys=True), -it.size))
        self.queue = collections.deque(order[i:i + chunk_size] for i in range(0, len(order), chunk_size))
        self.retry = collections.deque()     # single items after a death: the next death names its culprit
        self.failures = collections.Counter()
        self.replicas = [Replica(slot=i, devices=b) for i, b in enumerate(blocks)]
        self.ctx = multiprocessing.get_context("spawn")  # CUDA and vLLM need a fresh interpreter
        self.next_chunk = 0
        self.report = RunReport(output=None)
        self.coord_log = PartWriter(coordinator_file(parts, node))
        self.threads = max(1, int(os.environ.get("OMP_NUM_THREADS", 0)) or len(os.sched_getaffinity(0)) // len(blocks))
        from tqdm import tqdm

        self.bar = tqdm(total=len(items), unit="item", desc="infer", disable=not progress, dynamic_ncols=True)
        self.t0 = time.time()

    # ---- replicas ----
    def start(self, r: Replica) -> None:
        parent, child = self.ctx.Pipe()
        spec = {**self.spec, "slot": r.slot, "devices": r.devices, "threads": self.threads,
                "label": self.node * len(self.replicas) + r.slot}
        r.proc = self.ctx.Process(target=worker_main, args=(child, spec), name=f"infer-w{r.slot}", daemon=False)
        r.proc.start()
        child.close()
        r.conn, r.pid, r.loaded, r.chunk, r.part = parent, r.proc.pid, False, None, None

    def hand_out(self, r: Replica) -> None:
        if self.retry:
            items = [self.retry.popleft()]
        elif self.queue:
            items = self.queue.popleft()
        else:
            r.chunk = None
            return
        self.next_chunk += 1
        r.chunk = (self.next_chunk, items)
        try:
            r.conn.send(("chunk", self.next_chunk, [it.to_wire(self.failures[it.key]) for it in items]))
        except (BrokenPipeError, OSError):
            pass  # it died in between; its sentinel reports that and the chunk goes back

    def on_message(self, r: Replica, msg) -> None:
        kind = msg[0]
        if kind == "ready":
            r.loaded = r.ever_loaded = True
            if self.report.load_s is None:
                self.report.load_s = time.time() - self.t0
            r.part = msg[1]["part"]
            self.hand_out(r)
        elif kind == "fatal":
            r.fatal = msg[1]
        elif kind == "done":
            _, chunk_id, results = msg
            items = {it.key: it for it in r.chunk[1]} if r.chunk else {}
            for res in results:
                self.finish(r, items.get(res["key"]), res.get("output_tokens", 0), res.get("error"))
            r.chunk = None
            self.hand_out(r)

    def finish(self, r: Replica, item: Optional[Item], tokens: int, error: Optional[str]) -> None:
        if item is None:
            return
        if error:
            self.report.failed.append((item.id, f"generation failed: {error}"))
        else:
            self.report.done += 1
            self.report.tokens += tokens or 0
            label = self.node * len(self.replicas) + r.slot
            self.report.per_worker[label] = self.report.per_worker.get(label, 0) + 1
        self.bar.update(1)
        elapsed = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.report.tokens / elapsed:.1f} tok/s", refresh=False)

    @staticmethod
    def end_tree(r: Replica) -> None:
        """Kill what a replica started (a vLLM engine's processes) along with it: its process group."""
        try:
            os.killpg(r.pid, 9)
        except (ProcessLookupError, PermissionError, TypeError):
            pass

    def on_death(self, r: Replica) -> None:
        r.proc.join()
        self.end_tree(r)
        code = r.proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        try:
            import signal as _signal
            how = f"{_signal.Signals(-code).name}" if code is not None and code < 0 else how
        except ValueError:
            pass
        r.conn.close()
        if not r.loaded:
            r.retired = r.fatal or f"died while loading the model ({how})"
            self.bar.write(f"infer: worker {r.slot} on {r.devices} could not start: {r.retired}", file=sys.stderr)
            return
        self.report.deaths += 1
        if r.chunk:
            # What it finished is in its part file; the rest goes back, one item at a time.
            written = {rec["key"]: rec for rec in read_part(r.part)}
            for it in r.chunk[1]:
                rec = written.get(it.key)
                if rec is not None:
                    self.finish(r, it, rec.get("output_tokens", 0), rec.get("error"))
                    continue
                self.failures[it.key] += 1
                if self.failures[it.key] > self.max_retries:
                    why = f"killed its worker {self.failures[it.key]} times (last: {how}); set aside"
                    self.coord_log.write({"key": it.key, "index": it.index, "id": it.id, "error": why})
                    self.report.failed.append((it.id, why))
                    self.bar.update(1)
                else:
                    self.retry.append(it)
                    self.report.retried += 1
            self.bar.write(f"infer: worker {r.slot} (pid {r.pid}) died ({how}); its unfinished items go back",
                           file=sys.stderr)
            r.chunk = None
        else:
            r.idle_deaths += 1
        if r.idle_deaths > IDLE_DEATHS_ALLOWED:
            r.retired = f"died {r.idle_deaths} times with no item in hand (last: {how})"
        elif self.work_left():
            self.start(r)

    def work_left(self) -> bool:
        return bool(self.queue or self.retry or any(r.chunk for r in self.replicas))

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.retired is None and r.proc is not None and r.conn is not None
                and not r.conn.closed]

    def run(self) -> RunReport:
        for r in self.replicas:
            self.start(r)
        try:
            while self.work_left() and self.live():
                by_obj = {}
                for r in self.live():
                    by_obj[r.conn] = (r, r.proc)
                    by_obj[r.proc.sentinel] = (r, r.proc)
                for obj in wait(list(by_obj), timeout=1.0):
                    r, proc = by_obj[obj]
                    if r.proc is not proc or r.conn.closed:
                        continue  # its death was handled already this round (and it may have been restarted)
                    if obj is r.conn:
                        try:
                            self.on_message(r, r.conn.recv())
                            continue
                        except (EOFError, OSError):
                            pass
                    # exited: read what it sent before dying, then treat the death
                    try:
                        while r.conn.poll():
                            self.on_message(r, r.conn.recv())
                    except (EOFError, OSError):
                        pass
                    self.on_death(r)
        finally:
            self.stop_all()
            self.bar.close()
            self.coord_log.close()
        if self.work_left():
            why = "; ".join(f"worker {r.slot}: {r.retired}" for r in self.replicas if r.retired) or "no worker left"
            if not any(r.ever_loaded for r in self.replicas):
                raise RuntimeError(f"no replica could load the model: {why}")
            left = PartWriter(coordinator_file(self.parts, self.node))  # recorded, so the merge accounts for them
            for it in [it for c in self.queue for it in c] + list(self.retry):
                msg = f"not run: every worker was given up ({why})"
                left.write({"key": it.key, "index": it.index, "id": it.id, "error": msg})
                self.report.failed.append((it.id, msg))
            left.close()
        self.report.wall_s = time.time() - self.t0
        return self.report

    def stop_all(self) -> None:
        for r in self.replicas:
            if r.conn is not None and not r.conn.closed:
                try:
                    r.conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass
        for r in self.replicas:
            if r.proc is not None:
                r.proc.join(timeout=60)
                if r.proc.is_alive():
                    r.proc.kill()
                    r.proc.join()
                self.end_tree(r)
            if r.conn is not None and not r.conn.closed:
                r.conn.close()


# ---------------------------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------------------------

def infer(model_path: str, data_path: str, output_path: str, num_workers: int = 1, devices=None, backend: str = "hf",
          *, batch_size: int = 8, chunk_size: Optional[int] = None, max_retries: int = 2, dtype: str = "auto",
          nodes: Optional[int] = None, node_rank: Optional[int] = None, force: bool = False, progress: bool = True,
          **generation) -> RunReport:
    """Generate for every line of `data_path` with `num_workers` replicas of `model_path`; write `output_path`.

    Generation settings (max_new_tokens, temperature, top_p, seed) are keyword arguments; temperature 0 is greedy.
    Returns a RunReport (`ok` is False when an item failed or, with many nodes, others still have work)."""
    # Everything that can be checked without a model is checked first.
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: unknown; use one of {list(BACKENDS)}")
    if not backend_available(backend):
        raise ValueError(f"--backend {backend}: {backend} is not installed in this Python ({sys.executable}); "
                         f"{install_hint(backend)}")
    settings = check_settings(generation, "generation")
    for name, value, low in (("--batch-size", batch_size, 1), ("--chunk-size", chunk_size or 1, 1),
                             ("--max-retries", max_retries, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} {value!r}: must be an integer >= {low}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    fault = parse_fault(os.environ.get(FAULT_ENV))
    model_format(model_path)
    check_data(data_path)
    check_output_path(output_path, force)
    blocks = device_blocks(devices, num_workers)
    nodes, node_rank = node_placement(nodes, node_rank)
    if force and nodes > 1:
        raise ValueError("--force with --nodes > 1 would let each node delete the others' work; delete "
                         f"{parts_dir(output_path)} once before starting the nodes instead")
    inp = read_input(data_path, settings)
    for p in inp.problems:
        print(f"infer: {data_path}: {p} (this line gets an error row; the rest runs)", file=sys.stderr)
    if not inp.items:
        raise ValueError(f"data {data_path}: no usable line ({len(inp.problems)} malformed, {inp.lines} in all)"
                         + (f"; first: {inp.problems[0]}" if inp.problems else ""))
    manifest = {"model": os.path.abspath(model_path), "backend": backend, "dtype": dtype,
                "generation": normalized(settings)}
    parts = open_parts(output_path, manifest, force)

    records = read_records(parts)
    mine = node_slice(inp.items, nodes, node_rank)
    todo: dict[str, Item] = {}
    for it in mine:
        if it.key not in records.done:
            todo.setdefault(it.key, it)  # a repeated line (same id, prompt, settings) is generated once
    report = RunReport(output=None)
    if todo:
        model_dir = resolve_model(model_path, output_path, backend, progress)
        check_tokenizer(model_dir, list(todo.values()))
        if fault:
            print(f"infer: {FAULT_ENV} is set: workers kill themselves on {fault} (fault injection)", file=sys.stderr)
        spec = {"node": node_rank, "backend": backend, "model_dir": model_dir, "dtype": dtype,
                "batch_size": batch_size, "parts": parts}
        report = Coordinator(list(todo.values()), blocks, spec, chunk_size or batch_size, max_retries, parts,
                             node_rank, progress).run()
    report.total, report.skipped, report.nodes, report.node_rank = len(mine), len(mine) - len(todo), nodes, node_rank
    result = merge(inp, read_records(parts), output_path)
    report.output, report.missing = result.written, result.missing
    # The merge knows every failure (malformed lines, set-aside items, errors of other nodes); keep this run's
    # wording for the items it saw fail, add the rest.
    seen = {str(i) for i, _ in report.failed}
    report.failed += [(i, why) for i, why in result.failed if str(i) not in seen]
    return report


def merge_outputs(data_path: str, output_path: str, allow_missing: bool = False) -> MergeResult:
    """Join every node's part files into one ordered output, with the settings the runs recorded."""
    check_data(data_path)
    if os.path.isdir(output_path):
        raise ValueError(f"output {output_path} is a folder; give the OUT path the nodes were run with")
    parts = parts_dir(output_path)
    if not os.path.isdir(parts):
        raise ValueError(f"{parts}: no part files; run `python -m launch infer ... {output_path}` on the nodes first")
    manifest = read_manifest(parts)
    inp = read_input(data_path, manifest["generation"])
    return merge(inp, read_records(parts), output_path, allow_missing=allow_missing)


# ---------------------------------------------------------------------------------------------------------------
# Command line (python -m launch infer / infer-merge)
# ---------------------------------------------------------------------------------------------------------------

EPILOG = f"""
input:  one JSON object a line: {{"prompt": "..."}} or {{"messages": [{{"role": "user", "content": "..."}}]}}, an
        optional "id", and optional per-line max_new_tokens / temperature / top_p / seed
output: one object a line, in input order: id (the input's, or the 0-based line index), output, prompt_tokens,
        output_tokens, finish_reason (stop | length | error), worker; failed lines have output null and "error"
resume: run the same command again: finished items are skipped (OUT.parts/ holds them; delete it when done)
exit:   0 when every line has its output; 1 listing what could not be done; 2 for bad input before any model loads
debug:  {FAULT_ENV}="kill:ID" (or "kill-once:ID") makes a worker SIGKILL itself on that item: fault injection
        for trying the recovery, never for production runs
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch infer", description=infer.__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face folder (any family the project converts, our own modeling file's) or "
                                 "Megatron checkpoint (converted once to OUT.model, reused)")
    p.add_argument("data", help="input JSONL")
    p.add_argument("output", help="output JSONL (part files in OUT.parts/)")
    p.add_argument("--num-workers", type=int, default=1, help="replicas K; each takes N/K of the devices (default 1)")
    p.add_argument("--devices", help="GPU indices, e.g. 0,1,2,3 (default: every visible GPU, else the CPU)")
    p.add_argument("--backend", default="hf", help="hf (transformers generate) or vllm (one engine per replica)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="items per generate call (hf); sequences at once (vllm)")
    p.add_argument("--chunk-size", type=int, help="items handed to a worker at a time (default: the batch size)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="times an item may be handed out again after killing its worker before it is set aside")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16")
    p.add_argument("--nodes", type=int, help="nodes sharing the input (default: Slurm's SLURM_NTASKS, else 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: SLURM_PROCID, else 0)")
    p.add_argument("--force", action="store_true", help="start over: delete OUT.parts/ and OUT first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    gen = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    try:
        report = infer(a.model, a.data, a.output, a.num_workers, a.devices, a.backend, batch_size=a.batch_size,
                       chunk_size=a.chunk_size, max_retries=a.max_retries, dtype=a.dtype, nodes=a.nodes,
                       node_rank=a.node_rank, force=a.force, progress=not a.no_progress, **gen)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.output is None and report.missing and not report.failed:
        return 0  # this node is done; the merge waits for the others
    return 0 if report.ok else 1


def merge_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch infer-merge", description=merge_outputs.__doc__)
    p.add_argument("data", help="the input JSONL the nodes ran")
    p.add_argument("output", help="the OUT path the nodes were given (reads OUT.parts/)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the output even if some items are not done (they get error rows)")
    a = p.parse_args(argv)
    try:
        res = merge_outputs(a.data, a.output, allow_missing=a.allow_missing)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for item_id, why in res.failed[:20]:
        print(f"  FAILED id={item_id!r}: {why}")
    if res.written is None:
        print(f"infer-merge: {len(res.missing)} item(s) not done yet (first ids: {res.missing[:5]}); "
              f"nothing written. Re-run the nodes that did not finish (they resume), then merge again")
        return 1
    print(f"infer-merge: wrote {res.written} ({res.rows} rows, {len(res.failed)} failed)")
    return 0 if not res.failed else 1


__all__ = ["Coordinator", "RunReport", "device_blocks", "split_blocks", "infer", "main", "merge_main", "merge_outputs",
           "resolve_model"]
