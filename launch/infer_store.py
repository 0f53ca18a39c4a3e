"""What a multi-replica inference run keeps on disk, so that nothing finished is ever lost or done twice.

    OUT                     the merged output, written once everything is accounted for (temp file + rename)
    OUT.parts/run.json      the run-level settings the part files were written with (model, backend, dtype,
                            generation defaults); a re-run with other settings is refused, naming the setting
    OUT.parts/n<R>.w<S>.pid<P>.jsonl   one file per worker process: one JSON line per finished item, appended and
                            flushed as soon as the item is done; a killed worker leaves at most one torn last line
    OUT.parts/n<R>.coordinator.jsonl   items node R set aside (they killed their worker too often), for the report

The part files are the truth: a dead worker's finished items are read back from its file, a re-run reads them all
and skips every item whose key (id + prompt + settings) is there, and the merge joins them by key in input order.
Error records never count as done: a re-run tries those items again.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from checkpoint_tools.atomic_dir import fsync_path
from launch.infer_items import InputFile

MANIFEST = "run.json"
OUTPUT_FIELDS = ("id", "output", "prompt_tokens", "output_tokens", "finish_reason", "worker")


def parts_dir(output: str) -> str:
    return os.path.abspath(output) + ".parts"


def part_file(parts: str, node: int, slot: int, pid: int) -> str:
    return os.path.join(parts, f"n{node}.w{slot}.pid{pid}.jsonl")


def coordinator_file(parts: str, node: int) -> str:
    return os.path.join(parts, f"n{node}.coordinator.jsonl")


# ---- the run's settings ----

def check_output_path(output: str, force: bool) -> None:
    """Refuse an output that cannot be ours before anything loads."""
    if os.path.isdir(output):
        raise ValueError(f"output {output} is a folder; give a file path such as {os.path.join(output, 'out.jsonl')}")
    parts = parts_dir(output)
    if os.path.exists(parts) and not os.path.isdir(parts):
        raise ValueError(f"{parts} exists and is not a folder; move it away (the run keeps its part files there)")
    if os.path.exists(output) and not os.path.isdir(parts) and not force:
        raise ValueError(f"output {output} exists and no part files ({parts}) say which run wrote it; "
                         f"pass --force to overwrite it, or choose another output path")


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            out += [f"{k}.{d}" for d in _differences(old[k], new[k])]
        elif old.get(k) != new.get(k):
            out.append(f"{k} (part files: {old.get(k)!r}, now: {new.get(k)!r})")
    return out


def open_parts(output: str, manifest: dict, force: bool) -> str:
    """Create OUT.parts with this run's settings, or check an existing one against them. `force` starts over."""
    parts = parts_dir(output)
    if force:
        shutil.rmtree(parts, ignore_errors=True)
        if os.path.isfile(output):
            os.remove(output)
    os.makedirs(parts, exist_ok=True)
    path = os.path.join(parts, MANIFEST)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # exclusive: of nodes starting together, one writes it and the others compare
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    old = read_manifest(parts)
    diff = _differences(old, manifest)
    if diff:
        raise ValueError(f"{parts} holds results of other settings: {'; '.join(diff)}. Re-run with the same "
                         f"settings to resume, or pass --force to start over (deletes {parts} and {output})")
    return parts


def read_manifest(parts: str) -> dict:
    path = os.path.join(parts, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{parts} has no {MANIFEST}: it was not written by `infer` "
                         f"(or is still being created)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged ({e.msg}); pass --force to start over") from None


# ---- part files ----

class PartWriter:
    """Append-only JSONL that survives its writer being killed: each record is one line, flushed when written."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "a", encoding="utf-8")
        # A file reused after a kill (same pid name on a re-run) may end in a torn line: start on a fresh one.
        if self.f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self.f.write("\n")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def sync(self) -> None:
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def read_part(path: str) -> Iterator[dict]:
    """Records of one part file; a torn line (its writer was killed mid-write) is skipped."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                yield rec


def part_files(parts: str) -> list[str]:
    return sorted(glob.glob(os.path.join(parts, "n*.jsonl")))


@dataclass
class Records:
    done: dict[str, dict] = field(default_factory=dict)     # key -> the first finished record
    errors: dict[str, dict] = field(default_factory=dict)   # key -> the last error record (not done)

    def add(self, records: Iterable[dict]) -> None:
        for rec in records:
            if "error" in rec:
                self.errors[rec["key"]] = rec
            elif "output" in rec:
                self.done.setdefault(rec["key"], rec)


def read_records(parts: str) -> Records:
    out = Records()
    for path in part_files(parts):
        out.add(read_part(path))
    return out


# ---- the merge ----

@dataclass
class MergeResult:
    written: Optional[str]                                   # the output path, or None when items are missing
    rows: int = 0
    failed: list[tuple] = field(default_factory=list)        # (id, why) for malformed lines and set-aside items
    missing: list = field(default_factory=list)              # ids no node has finished or given up on


def output_row(item_id, rec: Optional[dict], error: Optional[str] = None) -> dict:
    if rec is not None:
        return {"id": item_id, **{k: rec.get(k) for k in OUTPUT_FIELDS if k != "id"}}
    return {"id": item_id, "output": None, "prompt_tokens": None, "output_tokens": 0, "finish_reason": "error",
            "worker": None, "error": error}


def merge(inp: InputFile, records: Records, output: str, allow_missing: bool = False) -> MergeResult:
    """One row per input line in input order: the finished record, or an error row for a malformed line or a
    set-aside item. Written (atomically) only when every item is finished or given up on, so a half-done run never
    leaves a whole-looking output."""
    by_index: dict[int, dict] = {}
    res = MergeResult(written=None)
    for p in inp.problems:
        by_index[p.index] = output_row(p.index, None, f"malformed input: {p}")
        res.failed.append((p.index, f"malformed input: {p}"))
    for it in inp.items:
        rec = records.done.get(it.key)
        if rec is not None:
            by_index[it.index] = output_row(it.id, rec)
        elif it.key in records.errors:
            why = records.errors[it.key]["error"]
            by_index[it.index] = output_row(it.id, None, why)
            res.failed.append((it.id, why))
        else:
            res.missing.append(it.id)
            by_index[it.index] = output_row(it.id, None, "not done: no node has finished this item")
    if res.missing and not allow_missing:
        return res
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{os.path.abspath(output)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for index in sorted(by_index):
                f.write(json.dumps(by_index[index], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(os.path.dirname(os.path.abspath(output)))
    res.written, res.rows = output, len(by_index)
    return res


__all__ = ["MANIFEST", "MergeResult", "PartWriter", "Records", "check_output_path", "coordinator_file", "merge",
           "open_parts", "output_row", "part_file", "part_files", "parts_dir", "read_manifest", "read_part",
           "read_records"]
