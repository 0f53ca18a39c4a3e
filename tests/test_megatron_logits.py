"""Real megatron-core, built from each converted checkpoint's own args at its own TP/PP (torchrun, gloo, CPU),
gives the logits of `LlamaForCausalLM` in fp32; and the way back to HF is bit-exact.

All checkpoints of one world size run in a single torchrun launch (the worker takes a list of jobs).
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_no_unexpected_warnings, cli_env, make_llama
from megatron_bridge.convert import ConvertOptions, hf_to_megatron, megatron_to_hf
from megatron_bridge.mcore_launcher import run_mcore_jobs
from megatron_bridge.verify import compare_hf_dirs, compare_logits, hf_logits, probe_tokens

TOL = 1e-4
SEQ = 64
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# name: (conversion options, model overrides)
CASES = {
    "tp1pp1": (dict(tp=1, pp=1), {}),
    "tp2_tied": (dict(tp=2, pp=1), dict(tie_word_embeddings=True)),
    "pp2": (dict(tp=1, pp=2), {}),
    "pp2_tied": (dict(tp=1, pp=2), dict(tie_word_embeddings=True)),
    "pp2_vpp2": (dict(tp=1, pp=2, vpp=2), {}),
    "tp2_te_names": (dict(tp=2, pp=1, name_style="te"), {}),
    "tp2_one_group": (dict(tp=2, pp=1), dict(num_key_value_heads=1)),
    "tp2_attention_bias": (dict(tp=2, pp=1), dict(attention_bias=True)),
    "tp2_llama3_rope": (dict(tp=2, pp=1), dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                               max_position_embeddings=16384)),
    "tp2pp2": (dict(tp=2, pp=2), {}),
    "tp2pp2_tied_te": (dict(tp=2, pp=2, name_style="te"), dict(tie_word_embeddings=True)),
    "tp4_two_groups": (dict(tp=4, pp=1), dict(num_attention_heads=8, num_key_value_heads=2)),
}


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """Convert every case, run all of them in megatron-core (one launch per world size), return per-case data."""
    root = tmp_path_factory.mktemp("logits")
    out, by_world = {}, {}
    for name, (opts, overrides) in CASES.items():
        hf = make_llama(str(root / name / "hf"), seed=hash(name) % 1000, **overrides)
        mg = str(root / name / "mg")
        hf_to_megatron(hf, mg, ConvertOptions(progress=False, **opts))
        tokens = probe_tokens(250, batch=2, seq_len=SEQ, seed=1)
        out[name] = {"hf": hf, "mg": mg, "ref": hf_logits(hf, tokens)}
        world = opts.get("tp", 1) * opts.get("pp", 1)
        by_world.setdefault(world, []).append((name, {"checkpoint": mg, "task": "logits",
                                                      "tokens": tokens.tolist()}))
    for world, jobs in sorted(by_world.items()):
        for (name, _), res in zip(jobs, run_mcore_jobs([j for _, j in jobs], nproc=world, timeout=900)):
            out[name]["mcore"] = res["logits"]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_core_logits_match_hf(results, case):
    r = results[case]
    rep = compare_logits(r["ref"], r["mcore"], TOL)
    assert r["mcore"].shape == (2, SEQ, 250)
    assert rep.max_abs <= TOL, f"{case}: max abs diff {rep.max_abs:.3e}"
    assert rep.argmax_agree == rep.positions


@pytest.mark.parametrize("case", list(CASES))
def test_back_to_hf_bit_exact(results, case, tmp_path):
    back = str(tmp_path / "back")
    megatron_to_hf(results[case]["mg"], back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(results[case]["hf"], back)
    assert rt.ok and rt.tensors_equal == rt.tensors_total > 0, (rt.mismatched, rt.config_diff)


def test_verify_command_passes_then_fails_on_a_corrupted_weight(results, tmp_path):
    """`verify` prints its table, exits 0 on a faithful conversion and 1 when one weight is off."""
    import shutil
    r = results["tp2_tied"]
    env = cli_env()  # as a user runs it: no warning filters
    ok = subprocess.run([sys.executable, "-m", "launch", "verify", r["hf"], r["mg"]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    assert "argmax agreement" in ok.stdout and "verdict" in ok.stdout and "PASS" in ok.stdout
    assert_no_unexpected_warnings(ok.stderr)
    bad = str(tmp_path / "bad")
    shutil.copytree(r["mg"], bad)
    path = os.path.join(bad, "release", "mp_rank_01", "model_optim_rng.pt")
    payload = torch.load(path, weights_only=False)
    payload["model"]["decoder.layers.1.mlp.linear_fc2.weight"] *= 1.5
    torch.save(payload, path)
    fail = subprocess.run([sys.executable, "-m", "launch", "verify", r["hf"], bad], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert fail.returncode == 1, fail.stdout + fail.stderr[-3000:]
    assert "FAIL" in fail.stdout and "differ" in fail.stdout
