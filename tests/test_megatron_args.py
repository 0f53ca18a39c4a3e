"""The canonical config <-> Megatron args table round-trips, from args alone (a checkpoint Megatron-LM wrote) and
with the recorded config; and what megatron-core cannot express is refused by name."""
import pytest
import torch

from checkpoint_tools.canonical import CanonicalConfig
from megatron_bridge.megatron_args import args_from_canonical, canonical_from_args, padded_vocab_size

BASE = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_theta=500000.0)
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}

VARIANTS = {
    "plain": {},
    "tied_mha": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "qkv_bias_only": dict(qkv_bias=True),
    "all_biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qk_norm": dict(qk_norm=True, head_dim=32),
    "llama3_rope": dict(rope_scaling=LLAMA3),
    "bf16": dict(dtype="bfloat16"),
    "gelu_tanh": dict(hidden_act="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_round_trip_from_args_alone(name, tp, pp, vpp):
    cfg = CanonicalConfig(**{**BASE, **VARIANTS[name]})
    a = args_from_canonical(cfg, tp=tp, pp=pp, vpp=vpp)
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (tp, pp)
    assert a.padded_vocab_size == padded_vocab_size(250, tp) and a.padded_vocab_size % (128 * tp) == 0
    # (variants keep o and mlp bias together: Megatron's add_bias_linear covers both, see the next test)
    assert canonical_from_args(a).to_dict() == cfg.to_dict()


def test_recorded_config_fills_what_args_cannot_say():
    """Qwen2-style q/k/v bias without o bias survives through the recorded config (args alone would say no bias
    split), and a recorded base keeps fields args lack (token ids)."""
    cfg = CanonicalConfig(**{**BASE, "qkv_bias": True, "bos_token_id": 1, "eos_token_id": [2, 3]})
    back = canonical_from_args(args_from_canonical(cfg, tp=2), base=cfg)
    assert back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn' has no megatron-core equivalent"),
    ({**LLAMA3, "high_freq_factor": 2.0}, "megatron-core's llama3 rope scaling fixes"),
])
def test_rope_scaling_megatron_cannot_express_is_refused(scaling, match):
    with pytest.raises(ValueError, match=match):
        args_from_canonical(CanonicalConfig(**{**BASE, "rope_scaling": scaling}))


def test_params_dtype_and_flags():
    a = args_from_canonical(CanonicalConfig(**{**BASE, "dtype": "bfloat16"}))
    assert a.params_dtype == torch.bfloat16 and a.bf16 and not a.fp16
