"""HF -> Megatron legacy -> HF is bit-exact (tensors, config, tokenizer files) across layouts; resharding too."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_no_unexpected_warnings, cli_env, make_llama
from megatron_bridge import legacy_format
from megatron_bridge.convert import ConvertOptions, convert, hf_to_megatron, megatron_to_hf
from megatron_bridge.verify import compare_hf_dirs

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

CASES = {
    "tp1pp1": (dict(tp=1, pp=1), {}),
    "tp2_tied": (dict(tp=2, pp=1), dict(tie_word_embeddings=True)),
    "pp2_tied": (dict(tp=1, pp=2), dict(tie_word_embeddings=True)),
    "tp2pp2_te": (dict(tp=2, pp=2, name_style="te"), {}),
    "tp4_groups2": (dict(tp=4, pp=1), dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)),
    "vpp2": (dict(tp=1, pp=2, vpp=2), {}),
    "bias_tp2pp2": (dict(tp=2, pp=2), dict(attention_bias=True)),
    "rope_llama3": (dict(tp=2, pp=1), dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, max_position_embeddings=16384)),
    "bf16_tp2": (dict(tp=2, pp=1), dict(_dtype=torch.bfloat16)),
    "divisible_by_64": (dict(tp=2, pp=1, make_vocab_size_divisible_by=64), {}),
}


def _make(path, overrides):
    overrides = dict(overrides)
    dtype = overrides.pop("_dtype", torch.float32)
    return make_llama(path, dtype=dtype, **overrides)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_megatron_hf_bit_exact(tmp_path, case):
    opts, overrides = CASES[case]
    hf = _make(str(tmp_path / "hf"), overrides)
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    hf_to_megatron(hf, mg, ConvertOptions(progress=False, **opts))
    ckpt = legacy_format.open_legacy(mg)
    tp, pp, vpp = opts.get("tp", 1), opts.get("pp", 1), opts.get("vpp", 1)
    assert (ckpt.tp, ckpt.pp, ckpt.vpp) == (tp, pp, vpp)
    payload = ckpt.ranks[(0, 0)]
    assert payload["checkpoint_version"] == 3.0 and payload["iteration"] == 0
    assert ("model0" in payload) == (vpp > 1) and ("model" in payload) == (vpp == 1)
    args = payload["args"]
    div = opts.get("make_vocab_size_divisible_by", 128)
    assert args.padded_vocab_size % (div * tp) == 0 and args.vocab_size == 250
    emb = ckpt.models(0, 0)[0]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == args.padded_vocab_size // tp
    if opts.get("name_style") == "te":
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in ckpt.models(0, 0)[0]
        assert "decoder.layers.0.mlp.linear_fc1._extra_state" in ckpt.models(0, 0)[0]
    megatron_to_hf(mg, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(hf, back)
    assert rt.tensors_total > 0 and rt.tensors_equal == rt.tensors_total, rt.mismatched
    assert not rt.missing and not rt.extra
    assert rt.config_equal, rt.config_diff
    assert rt.assets_total >= 2 and rt.assets_equal == rt.assets_total


def test_args_let_megatron_lm_resume(tmp_path):
    """The fields Megatron-LM's --use-checkpoint-args reads are present and consistent."""
    hf = make_llama(str(tmp_path / "hf"))
    mg = str(tmp_path / "mg")
    hf_to_megatron(hf, mg, ConvertOptions(tp=2, pp=2, progress=False))
    a = legacy_format.open_legacy(mg).args
    assert isinstance(a, argparse.Namespace)
    expected = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    group_query_attention=True, kv_channels=16, max_position_embeddings=128,
                    tensor_model_parallel_size=2, pipeline_model_parallel_size=2, position_embedding_type="rope",
                    normalization="RMSNorm", swiglu=True, add_bias_linear=False, add_qkv_bias=False,
                    untie_embeddings_and_output_weights=True, norm_epsilon=1e-6, rotary_base=10000,
                    padded_vocab_size=256, params_dtype=torch.float32)
    for k, v in expected.items():
        assert getattr(a, k) == v, k
    assert open(os.path.join(mg, "latest_checkpointed_iteration.txt")).read() == "release"
    assert os.path.isfile(os.path.join(mg, "release", "mp_rank_01_001", "model_optim_rng.pt"))


def test_reshard_without_hf_in_between(tmp_path):
    hf = make_llama(str(tmp_path / "hf"), num_attention_heads=8, num_key_value_heads=2)
    a, b, c, direct = (str(tmp_path / n) for n in ("tp4pp1", "tp2pp2", "tp1pp4", "direct_tp2pp2"))
    hf_to_megatron(hf, a, ConvertOptions(tp=4, pp=1, progress=False))
    what, _ = convert(a, b, ConvertOptions(tp=2, pp=2, progress=False))
    assert what == "megatron legacy -> megatron legacy"
    convert(b, c, ConvertOptions(tp=1, pp=4, progress=False))
    hf_to_megatron(hf, direct, ConvertOptions(tp=2, pp=2, progress=False))
    resharded, straight = legacy_format.open_legacy(b), legacy_format.open_legacy(direct)
    for key in straight.ranks:
        m1, m2 = resharded.models(*key)[0], straight.models(*key)[0]
        assert set(m1) == set(m2)
        assert all(torch.equal(m1[k], m2[k]) for k in m1)
    back = str(tmp_path / "back")
    megatron_to_hf(c, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(hf, back)
    assert rt.ok, (rt.mismatched, rt.config_diff)


def test_make_convert_and_cli(tmp_path):
    """The README's command: make convert SRC=.. DST=.. TP=.. PP=.. and back."""
    hf = make_llama(str(tmp_path / "hf"))
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    env = cli_env()  # as a user runs it: no warning filters
    r = subprocess.run(["make", "-s", "-C", ROOT, "convert", f"SRC={hf}", f"DST={mg}", "TP=2", "PP=2",
                        "ARGS=--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hf -> megatron" in r.stdout
    assert_no_unexpected_warnings(r.stderr)
    r = subprocess.run([sys.executable, "-m", "launch", "convert", mg, back], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_no_unexpected_warnings(r.stderr)
    assert compare_hf_dirs(hf, back).ok
    r = subprocess.run([sys.executable, "-m", "launch", "inspect", mg], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and "megatron_legacy" in r.stdout, r.stdout + r.stderr[-2000:]
    assert_no_unexpected_warnings(r.stderr)
    r = subprocess.run([sys.executable, "-m", "launch", "convert", mg, back], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "exists; pass --force" in r.stderr


def test_warning_check_flags_what_a_user_would_see():
    """The stderr check the CLI tests use: Python warnings and logged WARNING lines fail it unless listed."""
    clean = "writing mg: 100%|##########| 4/4 [00:00<00:00, 40.1rank/s]\n"
    assert_no_unexpected_warnings(clean)
    for noisy in ("/x/site-packages/megatron/core/utils.py:12: UserWarning: Transformer Engine is not installed",
                  "WARNING records no true vocab size; exporting all 256 padded rows"):
        with pytest.raises(AssertionError, match="unexpected warnings on stderr"):
            assert_no_unexpected_warnings(clean + noisy + "\n")
    assert_no_unexpected_warnings(noisy, expected=(r"records no true vocab size",))

