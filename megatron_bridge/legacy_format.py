"""Megatron-LM's legacy `torch` checkpoint layout: tracker file, iteration folder, one pickle per model rank.

    <root>/latest_checkpointed_iteration.txt      "release" or an iteration number
    <root>/release/ or <root>/iter_0000100/
        mp_rank_TT/model_optim_rng.pt             (PP == 1)
        mp_rank_TT_PPP/model_optim_rng.pt         (PP > 1)

Each pickle holds `args`, `checkpoint_version` (3.0), `iteration` and `model` (or `model0`, `model1`, ... with
virtual pipeline stages), optionally `optimizer`, `opt_param_scheduler` and `rng_state`. Rank files are written by
`rank_file_writer` (torch.save's format, streamed one tensor at a time), never by torch.save itself.
"""
from __future__ import annotations

import argparse
import os
import re
from contextlib import ExitStack
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from checkpoint_tools.pickle_trust import PolicyLike, trust_policy
from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.zip_integrity import check_zip_crc
from megatron_bridge.safe_load import safe_torch_load

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir_name(iteration: Optional[int]) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def is_legacy_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRACKER))


def read_tracker(root: str) -> Optional[int]:
    """None for `release`, else the iteration number."""
    with open(os.path.join(root, TRACKER)) as f:
        text = f.read().strip()
    if text == "release":
        return None
    if not text.isdigit():
        raise CheckpointError(f"{root}/{TRACKER}: expected 'release' or an iteration number, got {text!r}")
    return int(text)


def write_tracker(root: str, iteration: Optional[int]) -> None:
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("release" if iteration is None else str(iteration))


def rank_payload(args: argparse.Namespace, iteration: Optional[int], models: list[dict]) -> dict[str, Any]:
    """The dict Megatron-LM pickles per rank (`model` or `model0..N` for virtual pipeline chunks)."""
    payload: dict[str, Any] = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                               "iteration": iteration or 0}
    if len(models) == 1:
        payload["model"] = models[0]
    else:
        for v, m in enumerate(models):
            payload[f"model{v}"] = m
    return payload


def rank_file_path(root: str, iteration: Optional[int], tp_rank: int, pp_rank: int, pp: int) -> str:
    """`<root>/<iteration>/mp_rank_TT[_PPP]/model_optim_rng.pt`, its folder created."""
    d = os.path.join(root, iteration_dir_name(iteration), rank_dir_name(tp_rank, pp_rank, pp))
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, FILE_NAME)


def save_rank(root: str, iteration: Optional[int], tp_rank: int, pp_rank: int, pp: int, payload: dict) -> str:
    """Write a whole rank payload (e.g. a megatron-core model's state dicts) as torch.save would."""
    from megatron_bridge.rank_file_writer import write_torch_file  # imports torch: `inspect` reads without it

    return write_torch_file(rank_file_path(root, iteration, tp_rank, pp_rank, pp), payload)


def save_rank_streamed(root: str, iteration: Optional[int], tp_rank: int, pp_rank: int, args: argparse.Namespace,
                       tensors: Iterable[tuple[int, str, Any]], on_tensor: Callable[..., Any] = lambda: None,
                       **writer_options) -> str:
    """Write one rank file from (virtual chunk, name, tensor or None) items as they come (see save_ranks_streamed)."""
    return save_ranks_streamed(root, iteration, args, {(tp_rank, pp_rank): tensors}, on_tensor=on_tensor,
                               **writer_options)[0]


def save_ranks_streamed(root: str, iteration: Optional[int], args: argparse.Namespace,
                        ranks: dict[tuple[int, int], Iterable[tuple[int, str, Any]]],
                        on_tensor: Callable[..., Any] = lambda: None, max_in_flight: Optional[int] = None,
                        **writer_options) -> list[str]:
    """Write the rank files of `ranks` ((tp_rank, pp_rank) -> its (virtual chunk, name, tensor or None) items) at
    once, one tensor of each in turn; returns their paths in `ranks`' order.

    Each tensor (or list of row blocks standing for their concatenation) is written and released while the next is
    built, and the pickle, `rank_payload`'s dict with the tensors' stand-ins, goes last. Every file has its own
    writer thread: the copy into the page cache is what a write costs, one thread copies into one file at a time
    (the file system serialises writes to a file), so K files written together use K cores while this thread only
    builds views. `max_in_flight` bytes are shared among the files; `on_tensor` is called after each tensor is
    handed over (progress); `writer_options` go to every RankFileWriter.
    """
    from megatron_bridge.megatron_args import parallel_sizes
    from megatron_bridge.rank_file_writer import MAX_IN_FLIGHT, RankFileWriter, streaming_quietly

    _, pp, vpp = parallel_sizes(args)
    share = max(1, (max_in_flight or MAX_IN_FLIGHT) // len(ranks))
    with ExitStack() as stack:
        stack.enter_context(streaming_quietly())
        jobs = []
        for (tp_rank, pp_rank), items in ranks.items():
            path = rank_file_path(root, iteration, tp_rank, pp_rank, pp)
            writer = stack.enter_context(RankFileWriter(path, max_in_flight=share, **writer_options))
            jobs.append((writer, iter(items), [{} for _ in range(vpp)]))
        pending = list(jobs)
        while pending:
            for job in list(pending):
                writer, items, models = job
                item = next(items, None)
                if item is None:
                    pending.remove(job)
                    continue
                v, name, tensor = item
                del item
                if tensor is None:
                    models[v][name] = None
                    continue
                models[v][name] = writer.add(tensor)
                del tensor  # the writer holds it until written; the loop must not keep it alive past that
                on_tensor()
        return [writer.finish(rank_payload(args, iteration, models)) for writer, _, models in jobs]


@dataclass
class LegacyCheckpoint:
    """An opened legacy checkpoint: every rank file memory-mapped, nothing read until used."""

    root: str
    iteration: Optional[int]
    args: argparse.Namespace
    tp: int
    pp: int
    vpp: int
    # (tp_rank, pp_rank) -> the loaded pickle (tensors are mmap-backed)
    ranks: dict[tuple[int, int], dict] = field(repr=False, default_factory=dict)

    def models(self, tp_rank: int, pp_rank: int) -> list[dict]:
        payload = self.ranks[(tp_rank, pp_rank)]
        if "model" in payload:
            return [payload["model"]]
        return [payload[f"model{v}"] for v in range(self.vpp)]

    @property
    def has_optimizer_state(self) -> bool:
        return any("optimizer" in p for p in self.ranks.values())


def rank_folders(it_dir: str) -> dict[tuple[int, int], str]:
    """(tp_rank, pp_rank) -> folder name for every `mp_rank_TT` / `mp_rank_TT_PPP` folder in an iteration folder:
    the one place that knows how rank folders are named on disk."""
    found = {}
    for name in os.listdir(it_dir):
        m = _RANK_RE.match(name)
        if m:
            found[(int(m.group(1)), int(m.group(2)) if m.group(2) else 0)] = name
    return found


def _crc_checks(paths: list[str], enabled: bool) -> tuple[Optional[ThreadPoolExecutor], dict[str, Future]]:
    """Start the CRC check of every rank file at once, in threads: the check is one sequential read plus crc32,
    both of which release the GIL, so several files are read and summed in parallel (and overlap the pickle
    loads) instead of one after another. Callers wait for a file's result just before loading it, so the errors
    and their order stay those of checking one file at a time."""
    paths = [p for p in paths if os.path.exists(p)]
    if not enabled or not paths:
        return None, {}
    pool = ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8), thread_name_prefix="crc")
    return pool, {p: pool.submit(check_zip_crc, p) for p in paths}


def open_legacy(root: str, policy: PolicyLike = None, *, extra_globals: Iterable[str] = (),
                check_data: bool = True, loader: Callable[..., Any] = safe_torch_load) -> LegacyCheckpoint:
    """Every rank file, each scanned and loaded under the trust policy (plus `extra_globals` a user trusts).

    `check_data` verifies every record's CRC first (memory-mapped tensors are otherwise never checked); describing
    a checkpoint without using its tensors (`inspect`) can skip it, and read shapes only with
    `loader=checkpoint_tools.pickle_peek.peek_torch_file` (same policy, no torch)."""
    policy = trust_policy(policy).with_extra(extra_globals)
    if not is_legacy_checkpoint(root):
        raise CheckpointError(f"{root}: no {TRACKER}; not a Megatron legacy checkpoint")
    iteration = read_tracker(root)
    it_dir = os.path.join(root, iteration_dir_name(iteration))
    if not os.path.isdir(it_dir):
        raise CheckpointError(f"{root}: {TRACKER} points at {iteration_dir_name(iteration)}/, which is missing")
    found = rank_folders(it_dir)
    if not found:
        raise CheckpointError(f"{it_dir}: no mp_rank_* folders")
    first = os.path.join(it_dir, found[min(found)], FILE_NAME)
    if not os.path.exists(first):
        raise CheckpointError(f"{first} is missing")
    pool, checks = _crc_checks([os.path.join(it_dir, found[k], FILE_NAME) for k in sorted(found)], check_data)
    try:
        if check_data:
            checks[first].result()
        payload0 = loader(first, policy=policy)
        args = payload0.get("args")
        if args is None:
            raise CheckpointError(f"{first}: no 'args' in the checkpoint; cannot tell its architecture")
        version = payload0.get("checkpoint_version", 0)
        if version < 3.0:
            raise CheckpointError(f"{first}: checkpoint_version={version}; only 3.0 (fused QKV grouped per KV head) "
                                  f"is supported")
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
        want = {(t, p) for t in range(tp) for p in range(pp)}
        missing = sorted(want - set(found))
        if missing:
            raise CheckpointError(f"{it_dir}: args say TP={tp} PP={pp} but rank folders are missing: "
                                  f"{[rank_dir_name(t, p, pp) for t, p in missing]}")
        extra = sorted(set(found) - want)
        if extra:
            raise CheckpointError(f"{it_dir}: rank folders beyond TP={tp} PP={pp}: {[found[k] for k in extra]}")
        ranks = {min(found): payload0}
        for key in sorted(want - {min(found)}):
            path = os.path.join(it_dir, found[key], FILE_NAME)
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is missing")
            if check_data:
                checks[path].result()
            ranks[key] = loader(path, policy=policy)
    except BaseException:
        if pool is not None:  # do not wait for the other files' reads before reporting
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown()
    return LegacyCheckpoint(root, iteration, args, tp, pp, vpp, ranks)


def load_rank(root: str, tp_rank: int, pp_rank: int, policy: PolicyLike = None, *,
              extra_globals: Iterable[str] = (), check_data: bool = True) -> dict:
    """One rank's pickle (memory-mapped), for a process that needs only its own shard; `check_data` verifies its
    records' CRCs first (skip it when only `args` are read)."""
    it_dir = os.path.join(root, iteration_dir_name(read_tracker(root)))
    folder = rank_folders(it_dir).get((tp_rank, pp_rank)) if os.path.isdir(it_dir) else None
    path = os.path.join(it_dir, folder or rank_dir_name(tp_rank, pp_rank, 2), FILE_NAME)
    if folder is None or not os.path.exists(path):
        raise CheckpointError(f"{path} is missing")
    if check_data:
        check_zip_crc(path)
    return safe_torch_load(path, policy=policy, extra_globals=extra_globals)


def payload_models(payload: dict) -> list[dict]:
    if "model" in payload:
        return [payload["model"]]
    return [payload[k] for k in sorted((k for k in payload if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))]
