"""torchrun entry point: run a Megatron checkpoint in real megatron-core at its own TP/PP and report tokens/logits.

    torchrun --nproc_per_node TP*PP -m megatron_bridge.mcore_worker JOBS.json

JOBS.json is a list of jobs, each {"checkpoint", "task": "logits" | "generate", "tokens": [[ids]], "out",
"max_new_tokens", "eos_token_id"}; every job's TP*PP must equal the world size. Each process loads only its own
rank file. The last pipeline stage's TP rank 0 writes `out` (torch.save of a dict).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_bridge import cpu_runtime
from megatron_bridge.legacy_format import load_rank, payload_models
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


def run_job(job: dict) -> None:
    from megatron.core import parallel_state as ps

    root = job["checkpoint"]
    world = dist.get_world_size()
    # Each job may have its own layout: re-initialize the groups for it.
    probe = load_rank(root, 0, 0)
    args = probe["args"]
    tp, pp, vpp = parallel_sizes(args)
    if tp * pp != world:
        raise SystemExit(f"{root}: TP*PP={tp * pp} but world size is {world}")
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    cpu_runtime.seed(1234)
    payload = load_rank(root, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    models = build_models(args)
    load_weights(models, payload_models(payload))
    for m in models:
        m.eval()
    vocab = job.get("vocab_size") or getattr(args, "vocab_size", None) or args.padded_vocab_size
    tokens = torch.tensor(job["tokens"], dtype=torch.long)
    with torch.no_grad():
        if job["task"] == "logits":
            result = {"logits": _forward_logits(models, tokens, vocab)}
        elif job["task"] == "generate":
            result = {"tokens": _greedy(models, tokens, vocab, job["max_new_tokens"], job.get("eos_token_id"))}
        else:
            raise SystemExit(f"unknown task {job['task']!r}")
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(result, job["out"])
    dist.barrier()


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
