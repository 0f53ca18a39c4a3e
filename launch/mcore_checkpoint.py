"""Training checkpoints in Megatron-LM's layout, saved and resumed by ``launch.pretrain_gpt``.

    <save>/latest_checkpointed_iteration.txt          the last complete iteration (the commit point)
    <save>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt    --ckpt-format torch (legacy)
    <save>/iter_0000100/{metadata.json, common.pt, *.distcp}   --ckpt-format torch_dist
    <save>/workbench.json, hf_assets/                 carried from --load, so the converters go back to Hugging Face

Each legacy rank file holds what Megatron-LM's own ``save_checkpoint`` writes: ``args`` (a Namespace Megatron-LM
and our converters can read), ``checkpoint_version`` 3.0, ``iteration``, ``model`` (``model0``, ``model1``, ... with
virtual pipeline stages; the unwrapped module's state dict, local names), ``optimizer``, ``opt_param_scheduler`` and
``rng_state``. The optimizer is not distributed, so data-parallel rank 0 writes for its model rank, as Megatron-LM
does. An iteration is written into a hidden staging folder and renamed when every rank is done; the tracker is
replaced last, so a crash mid-save leaves the previous checkpoint in force.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from checkpoint_tools.pickle_trust import trust_policy
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import legacy_format, sidecar, torch_dist_format

FORMATS = ("torch", "torch_dist")


def checkpoint_format(root: str) -> str:
    """'torch' (legacy) or 'torch_dist' for a checkpoint folder; a clear error for anything else."""
    if not os.path.isdir(root):
        raise ValueError(f"--load {root!r} does not exist; give a checkpoint folder (with "
                         f"{legacy_format.TRACKER}) written by `python -m launch convert` or by a previous run")
    if not legacy_format.is_legacy_checkpoint(root):
        raise ValueError(f"--load {root!r} has no {legacy_format.TRACKER}; it is not a Megatron checkpoint "
                         "(convert a Hugging Face folder first: python -m launch convert HF_DIR MEGATRON_DIR)")
    return "torch_dist" if torch_dist_format.is_torch_dist_checkpoint(root) else "torch"


def read_args(root: str, allow_globals: Iterable[str] = ()) -> tuple[argparse.Namespace, int, str]:
    """(args, iteration, format) of a checkpoint, read without megatron-core or a process group."""
    fmt = checkpoint_format(root)
    iteration = legacy_format.read_tracker(root) or 0
    if fmt == "torch_dist":
        common = torch_dist_format.validate(root, trust_policy(allow_globals))
        return common["args"], iteration, fmt
    payload = legacy_format.load_rank(root, 0, 0, trust_policy(allow_globals))
    args = payload.get("args")
    if args is None:
        raise CheckpointError(f"{root}: the rank file has no 'args'; cannot tell the model's shape")
    if payload.get("checkpoint_version", 0) < 3.0:
        raise CheckpointError(f"{root}: checkpoint_version={payload.get('checkpoint_version')}; only 3.0 is read")
    return args, iteration, fmt


def _model_key(models: list, v: int) -> str:
    return "model" if len(models) == 1 else f"model{v}"


def rng_state() -> dict:
    """This rank's RNG states, in Megatron-LM's shape (``cuda_rng_state`` only where CUDA exists)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _staging(save: str, iteration: int) -> str:
    return os.path.join(save, f".{legacy_format.iteration_dir_name(iteration)}.staging")


def save(save: str, iteration: int, args: argparse.Namespace, models: list, optimizer, scheduler, fmt: str,
         sidecar_from: Optional[str], write_sidecar=None) -> str:
    """Save every rank's share of iteration ``iteration`` under ``save``; every rank must call this.

    Args:
        models: this rank's unwrapped model chunks.
        sidecar_from: a checkpoint root whose ``workbench.json``/``hf_assets`` to carry over (None: ``write_sidecar``
            writes one, for a model trained from scratch).
    """
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    staging = _staging(save, iteration)
    final = os.path.join(save, legacy_format.iteration_dir_name(iteration))
    if rank == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    args = argparse.Namespace(**vars(args))
    args.iteration = iteration
    args.ckpt_format, args.use_dist_ckpt = fmt, fmt == "torch_dist"
    if fmt == "torch":
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            payload = legacy_format.rank_payload(
                args, iteration, [{k: v for k, v in m.state_dict().items() if not k.endswith("._extra_state")}
                                  for m in models])
            payload["optimizer"] = optimizer.state_dict()
            payload["opt_param_scheduler"] = scheduler.state_dict()
            payload["rng_state"] = [rng_state()]
            d = os.path.join(staging, legacy_format.rank_dir_name(
                ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                ps.get_pipeline_model_parallel_world_size()))
            os.makedirs(d, exist_ok=True)
            torch.save(payload, os.path.join(d, legacy_format.FILE_NAME))
    else:
        _save_torch_dist(staging, iteration, args, models, optimizer, scheduler)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if not os.path.exists(os.path.join(save, sidecar.SIDECAR)):
            if sidecar_from and os.path.abspath(sidecar_from) != os.path.abspath(save):
                sidecar.copy_sidecar(sidecar_from, save)
            elif write_sidecar is not None:
                write_sidecar(save)
        tmp = os.path.join(save, legacy_format.TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(save, legacy_format.TRACKER))
    dist.barrier()
    return final


def _sharded_state(models: list, optimizer, is_loading: bool) -> dict:
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    state = {_model_key(models, v): m.sharded_state_dict(metadata={"dp_cp_group": group})
             for v, m in enumerate(models)}
    if optimizer is not None:
        merged = {}
        for v in range(len(models)):
            merged.update(state[_model_key(models, v)])
        state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                          metadata=dict(torch_dist_format.CONTENT_METADATA))
    return state


def _rng_sharded(is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))
    return ShardedObject("rng_state", None if is_loading else [rng_state()], shape, (pp, tp, dp),
                         replica_id=0)


def _save_torch_dist(directory: str, iteration: int, args, models, optimizer, scheduler) -> None:
    from megatron.core import dist_checkpointing

    state = _sharded_state(models, optimizer, is_loading=False)
    state.update(args=args, checkpoint_version=legacy_format.CHECKPOINT_VERSION, iteration=iteration,
                 opt_param_scheduler=scheduler.state_dict(), rng_state=_rng_sharded(False))
    with torch.serialization.safe_globals([argparse.Namespace]):
        dist_checkpointing.save(state, directory, content_metadata=dict(torch_dist_format.CONTENT_METADATA))


def load(root: str, models: list, optimizer, scheduler, *, load_optim: bool, load_rng: bool,
         allow_globals: Iterable[str] = ()) -> bool:
    """Fill this rank's chunks (and optimizer, scheduler, RNG when the checkpoint has them and they are wanted).

    Returns:
        True when optimizer state was restored (a resumed run), False for weights only (a converted checkpoint).
    """
    from megatron.core import parallel_state as ps

    if checkpoint_format(root) == "torch_dist":
        return _load_torch_dist(root, models, optimizer, scheduler, load_optim, load_rng, allow_globals)
    payload = legacy_format.load_rank(root, ps.get_tensor_model_parallel_rank(),
                                      ps.get_pipeline_model_parallel_rank(), trust_policy(allow_globals))
    from megatron_bridge.model_builder import load_weights

    load_weights(models, legacy_format.payload_models(payload))
    resumed = False
    if load_optim and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["opt_param_scheduler"])
        resumed = True
    if load_rng and "rng_state" in payload:
        set_rng_state(payload["rng_state"][0])
    return resumed


def _has_optimizer_state(root: str, allow_globals: Iterable[str]) -> bool:
    meta = torch_dist_format.read_dcp_metadata(root, trust_policy(allow_globals))
    return any(k.startswith("optimizer.") for k in meta.state_dict_metadata)


def _load_torch_dist(root, models, optimizer, scheduler, load_optim, load_rng, allow_globals) -> bool:
    with_optim = load_optim and _has_optimizer_state(root, allow_globals)
    template = _sharded_state(models, optimizer if with_optim else None, is_loading=True)
    if with_optim and load_rng:
        template["rng_state"] = _rng_sharded(True)
    # dist_load vets .metadata, common.pt and every byte object under the policy before megatron-core reads them.
    state = torch_dist_format.dist_load(template, root, trust_policy(allow_globals))
    for v, m in enumerate(models):
        m.load_state_dict(state[_model_key(models, v)], strict=True)
    if not with_optim:
        return False
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng and state.get("rng_state"):
        set_rng_state(state["rng_state"][0])
    return True
