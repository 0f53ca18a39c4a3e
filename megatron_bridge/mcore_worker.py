"""torchrun entry point: run a Megatron checkpoint in real megatron-core at its own TP/PP and report tokens/logits.

    torchrun --nproc_per_node TP*PP -m megatron_bridge.mcore_worker JOBS.json

JOBS.json is a list of jobs, each {"checkpoint", "task", ...}; every job's TP*PP must equal the world size. A job's
"trust" is the launching command's pickle trust policy (TrustPolicy.to_json): checkpoints load under it here too.
    logits         "tokens": [[ids]], "out": last stage TP rank 0 saves {"logits"}
    generate       "tokens": [[prompt]], "max_new_tokens", "eos_token_id", "out": saves {"tokens"}
    to_torch_dist  "out_dir": save the checkpoint as torch_dist (megatron.core.dist_checkpointing)
    to_legacy      "out_root", "iteration": save this rank's legacy rank file
A legacy checkpoint runs at its own layout, each process loading only its own rank file; a torch_dist checkpoint runs
at its saved layout or at the job's "tp"/"pp"/"vpp" (resharded at load).
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    # Armed before the seconds of imports below: a torchrun stopped during our start-up must not leave us
    # waiting on its rendezvous for ever, holding the launcher's pipes open.
    from checkpoint_tools.interrupts import die_with_parent

    die_with_parent()

import torch
import torch.distributed as dist

from checkpoint_tools.pickle_trust import PolicyLike, TrustPolicy
from megatron_bridge import cpu_runtime, legacy_format, torch_dist_format
from megatron_bridge.legacy_format import load_rank, payload_models
from megatron_bridge.mcore_launcher import PROGRESS_PREFIX
from megatron_bridge.model_builder import build_models, load_weights
from megatron_bridge.megatron_args import parallel_sizes


def _forward_logits(models: list, tokens: torch.Tensor, vocab_size: int):
    """Full-vocab logits [b, s, vocab] on the last stage (None elsewhere) through megatron-core's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # The interleaved schedule needs a multiple of PP micro-batches: repeat the batch and keep the first result.
    n_micro = ps.get_pipeline_model_parallel_world_size() if len(models) > 1 else 1

    def step(data_iterator, model):
        ids = next(data_iterator)
        return model(ids, position_ids, None), None

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=[iter([tokens] * n_micro) for _ in models],
        model=models if len(models) > 1 else models[0], num_microbatches=n_micro, seq_length=s,
        micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = gather_from_tensor_model_parallel_region(out[0].contiguous())
    return logits[..., :vocab_size].float()


def _greedy(models: list, prompt: torch.Tensor, vocab_size: int, max_new: int, eos) -> list[int]:
    from megatron.core import parallel_state as ps

    tokens = prompt.clone()
    new: list[int] = []
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for _ in range(max_new):
        logits = _forward_logits(models, tokens, vocab_size)
        nxt = torch.zeros(1, dtype=torch.long)
        if logits is not None:
            nxt[0] = int(logits[0, -1].argmax())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        new.append(int(nxt[0]))
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        if new[-1] in eos_ids:
            break
    return new


def _with_layout(args, tp: int, pp: int, vpp: int):
    """A copy of `args` at another parallel layout (torch_dist reshards at load; the padded vocab must still split)."""
    import argparse

    if args.padded_vocab_size % tp:
        raise SystemExit(f"padded_vocab_size={args.padded_vocab_size} (fixed by the checkpoint) is not divisible by "
                         f"TP={tp}; choose a TP that divides it")
    out = argparse.Namespace(**vars(args))
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = tp, pp
    out.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    out.num_layers_per_virtual_pipeline_stage = args.num_layers // (pp * vpp) if vpp > 1 else None
    out.world_size = tp * pp
    return out


def _init_parallel(args) -> None:
    from megatron.core import parallel_state as ps

    tp, pp, vpp = parallel_sizes(args)
    if tp * pp != dist.get_world_size():
        raise SystemExit(f"TP*PP={tp * pp} but world size is {dist.get_world_size()}")
    # Each job may have its own layout: re-initialize the groups for it.
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    cpu_runtime.seed(1234)


def load_models(job: dict):
    """(args, model chunks) of this rank for a legacy checkpoint at its own layout, or a torch_dist checkpoint at
    its saved layout or the one the job names (`tp`, `pp`, `vpp`), resharded at load by megatron-core."""
    from megatron.core import parallel_state as ps

    root = job["checkpoint"]
    policy = TrustPolicy.from_json(job.get("trust"))  # the launching command's policy, --allow-global included
    if torch_dist_format.is_torch_dist_checkpoint(root):
        common = torch_dist_format.validate(root, policy)
        saved = common["args"]
        tp, pp, vpp = parallel_sizes(saved)
        args = _with_layout(saved, job.get("tp") or tp, job.get("pp") or pp, job.get("vpp") or vpp)
        _init_parallel(args)
        models = build_models(args)
        load_torch_dist(models, root, policy)
        return args, models
    args = load_rank(root, 0, 0, policy, check_data=False)["args"]
    _init_parallel(args)
    payload = load_rank(root, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), policy)
    models = build_models(args)
    load_weights(models, payload_models(payload))
    return args, models


def _model_keys(models: list) -> list[str]:
    return ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]


def load_torch_dist(models: list, root: str, policy: PolicyLike = None) -> None:
    """Fill `models` from a torch_dist checkpoint through megatron.core.dist_checkpointing (reshards at load);
    every pickle in it passes the trust policy first (torch_dist_format.dist_load)."""
    template = {k: m.sharded_state_dict() for k, m in zip(_model_keys(models), models)}
    state = torch_dist_format.dist_load(template, root, policy)
    for k, m in zip(_model_keys(models), models):
        m.load_state_dict(state[k], strict=True)


def save_torch_dist(models: list, args, iteration, out_dir: str) -> None:
    """Save this rank's chunks as Megatron-LM does for --ckpt-format torch_dist."""
    import argparse

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    args = argparse.Namespace(**vars(args))
    args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration or 0}
    group = ps.get_data_parallel_group(with_context_parallel=True)
    for k, m in zip(_model_keys(models), models):
        state[k] = m.sharded_state_dict(metadata={"dp_cp_group": group})
    os.makedirs(out_dir, exist_ok=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        dist_checkpointing.save(state, out_dir, content_metadata=dict(torch_dist_format.CONTENT_METADATA))


def save_legacy_rank(models: list, args, iteration, out_root: str) -> None:
    """Write this rank's chunks as a legacy rank file (local names)."""
    import argparse

    from megatron.core import parallel_state as ps

    args = argparse.Namespace(**vars(args))
    args.ckpt_format, args.use_dist_ckpt = "torch", False
    sds = [{k: v for k, v in m.state_dict().items() if not k.endswith("._extra_state")} for m in models]
    _, pp, _ = parallel_sizes(args)
    legacy_format.save_rank(out_root, iteration, ps.get_tensor_model_parallel_rank(),
                            ps.get_pipeline_model_parallel_rank(), pp,
                            legacy_format.rank_payload(args, iteration, sds))


def report(message: str) -> None:
    """One progress line on stderr from global rank 0; the launcher turns these into its progress bar."""
    if dist.get_rank() == 0:
        print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)


def run_job(job: dict) -> None:
    from megatron.core import parallel_state as ps

    args, models = load_models(job)
    for m in models:
        m.eval()
    task = job["task"]
    report(f"{os.path.basename(job['checkpoint'].rstrip('/'))} loaded into megatron-core")
    if task == "to_torch_dist":
        save_torch_dist(models, args, job.get("iteration"), job["out_dir"])
        dist.barrier()
        report("torch_dist saved")
        return
    if task == "to_legacy":
        save_legacy_rank(models, args, job.get("iteration"), job["out_root"])
        dist.barrier()
        report("legacy rank files saved")
        return
    vocab = job.get("vocab_size") or getattr(args, "vocab_size", None) or args.padded_vocab_size
    tokens = torch.tensor(job["tokens"], dtype=torch.long)
    with torch.no_grad():
        if task == "logits":
            result = {"logits": _forward_logits(models, tokens, vocab)}
        elif task == "generate":
            result = {"tokens": _greedy(models, tokens, vocab, job["max_new_tokens"], job.get("eos_token_id"))}
        else:
            raise SystemExit(f"unknown task {task!r}")
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(result, job["out"])
    dist.barrier()
    report(f"{task} done")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        jobs = json.load(f)
    cpu_runtime.enable()
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        for job in jobs:
            run_job(job)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
