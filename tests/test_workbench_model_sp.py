"""Ulysses sequence parallelism over 2 gloo ranks (one torchrun launch, several models): logits and gradients
equal the single-process ones.

Each rank builds the same random workbench model (fixed seed), computes the reference forward/backward on the full
sequence by itself, then the sequence-parallel one on its half; gathered logits and all-reduced gradients are
compared. Cases: GQA with KV heads split over ranks, one KV head (repeated before the split), Qwen3-style q/k norm
with biases, Llama-3 rope. Run as a script, this file is the torchrun worker.
"""
import json
import os
import signal
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORLD = 2
CASES = {
    "gqa_split": dict(num_key_value_heads=2),
    "one_kv_head": dict(num_key_value_heads=1),
    "qk_norm_bias": dict(num_key_value_heads=2, qk_norm=True, attention_bias=True, attention_out_bias=True),
    "llama3_rope": dict(num_key_value_heads=4, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
}


def worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from checkpoint_tools.modeling_workbench import WorkbenchConfig, WorkbenchForCausalLM
    from checkpoint_tools.sequence_parallel import (enable_sequence_parallel, gather_sequence,
                                                    sequence_parallel_forward, shard_sequence)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name, overrides in CASES.items():
        torch.manual_seed(0)
        cfg = WorkbenchConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=4, head_dim=16, max_position_embeddings=128, **overrides)
        model = WorkbenchForCausalLM(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
                elif n.endswith(".bias"):
                    p.normal_(0, 0.1)
        ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # next token, shifted before sharding

        ref_logits = model(ids).logits
        F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        enable_sequence_parallel(model)
        local = sequence_parallel_forward(model, ids).logits
        F.cross_entropy(local.flatten(0, 1), shard_sequence(labels).flatten(), ignore_index=-100,
                        reduction="sum").backward()
        full = gather_sequence(local.detach())
        grad_diff = 0.0
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)  # each rank holds its tokens' share of the gradient
            grad_diff = max(grad_diff, (p.grad - ref_grads[n]).abs().max().item())
        results[name] = {"logits": (full - ref_logits.detach()).abs().max().item(), "grads": grad_diff,
                         "local_len": local.shape[1], "grad_scale": max(g.abs().max().item()
                                                                        for g in ref_grads.values())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_ulysses_over_two_gloo_ranks_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), __file__,
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun hung:\n{err[-6000:]}") from None
    assert proc.returncode == 0, err[-6000:]
    for rank in range(WORLD):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        assert set(res) == set(CASES)
        for name, r in res.items():
            print(f"\nrank {rank} {name}: logits diff {r['logits']:.2e}, grad diff {r['grads']:.2e}")
            assert r["local_len"] == 48 // WORLD  # each rank really ran half the sequence
            assert r["logits"] <= 1e-5, (name, r)
            assert r["grads"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, r)


def test_sequence_parallel_refuses_what_it_cannot_run():
    import pytest
    from checkpoint_tools.modeling_workbench import WorkbenchConfig, WorkbenchForCausalLM
    from checkpoint_tools.sequence_parallel import enable_sequence_parallel
    model = WorkbenchForCausalLM(WorkbenchConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"needs torch.distributed initialised"):
        enable_sequence_parallel(model)


if __name__ == "__main__":
    worker(sys.argv[1])
