"""The canonical config <-> Megatron args table round-trips, from args alone (a checkpoint Megatron-LM wrote) and
with the recorded config; and what megatron-core cannot express is refused by name."""
import re

import pytest
import torch

from checkpoint_tools.canonical import CanonicalConfig
from megatron_bridge.megatron_args import (UNEXPRESSIBLE_ARGS, args_from_canonical, canonical_from_args,
                                           padded_vocab_size, resharded_args, true_vocab_from_args)

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


def _not_harmless(u):
    """A value of `u`'s field that changes the arithmetic (any value outside its harmless set)."""
    first = u.harmless[0]
    if isinstance(first, bool):
        return not first
    if first is None:
        return 2
    if isinstance(first, str):
        return "LayerNorm" if u.arg == "normalization" else "learned_absolute"
    return first + 0.5


@pytest.mark.parametrize("u", UNEXPRESSIBLE_ARGS, ids=lambda u: u.arg)
def test_each_field_canonical_cannot_express_is_refused_by_name(u):
    """Every entry of the table, set to a value that changes the model, stops the read and is named."""
    a = args_from_canonical(CanonicalConfig(**BASE))
    assert getattr(a, u.arg) == u.harmless[0]  # what we write is the harmless value
    setattr(a, u.arg, _not_harmless(u))
    with pytest.raises(ValueError, match=rf"{u.arg}=.*\({re.escape(u.what)}\).*cannot express"):
        canonical_from_args(a)


def test_several_unexpressible_fields_are_named_at_once():
    a = args_from_canonical(CanonicalConfig(**BASE))
    a.rotary_percent, a.qk_l2_norm = 0.5, True
    with pytest.raises(ValueError, match=r"rotary_percent=0\.5 .*qk_l2_norm=True"):
        canonical_from_args(a)


def test_norm_epsilon_under_each_name_megatron_lm_uses():
    """core_r0.16.0 records --norm-epsilon as `layernorm_epsilon`; earlier releases and tools/checkpoint as
    `norm_epsilon`. Either is read; two that disagree are refused; none means Megatron's own default 1e-5."""
    a = args_from_canonical(CanonicalConfig(**BASE))
    assert a.layernorm_epsilon == a.norm_epsilon == 1e-6
    del a.norm_epsilon
    assert canonical_from_args(a).rms_norm_eps == 1e-6
    a.norm_epsilon, a.layernorm_epsilon = 1e-6, None
    assert canonical_from_args(a).rms_norm_eps == 1e-6
    a.layernorm_epsilon = 1e-5
    with pytest.raises(ValueError, match="rms_norm_eps under several names that disagree"):
        canonical_from_args(a)
    del a.layernorm_epsilon, a.norm_epsilon
    assert canonical_from_args(a).rms_norm_eps == 1e-5


def test_older_spellings_megatron_lm_maps_at_load():
    a = args_from_canonical(CanonicalConfig(**{**BASE, "qkv_bias": True, "o_bias": True, "mlp_bias": True}))
    del a.add_bias_linear, a.position_embedding_type
    a.disable_bias_linear = False
    a.use_rotary_position_embeddings = True
    cfg = canonical_from_args(a)
    assert cfg.o_bias and cfg.mlp_bias
    a.use_rotary_position_embeddings = False
    a.position_embedding_type = "learned_absolute"
    with pytest.raises(ValueError, match="position_embedding_type='learned_absolute'"):
        canonical_from_args(a)


def test_true_vocab_from_what_megatron_lm_records():
    a = args_from_canonical(CanonicalConfig(**BASE))
    a.vocab_size = None  # a run with a Hugging Face tokenizer records only the padded size
    assert true_vocab_from_args(a) is None and canonical_from_args(a).vocab_size == a.padded_vocab_size == 256
    a.vocab_size, a.tokenizer_type = 249, "NullTokenizer"  # --vocab-size 249: ids 0..248 plus end-of-document
    assert true_vocab_from_args(a) == 250 and canonical_from_args(a).vocab_size == 250


@pytest.mark.parametrize("tp,divisible_by,padded", [(1, 128, 256), (2, 128, 256), (2, 64, 256), (4, 128, 512),
                                                    (4, 32, 256)])
def test_resharding_pads_by_megatron_lms_rule(tp, divisible_by, padded):
    cfg = CanonicalConfig(**BASE)
    old = args_from_canonical(cfg, tp=2)
    new = resharded_args(old, cfg, vocab_known=True, tp=tp, pp=1, vpp=1, divisible_by=divisible_by)
    assert (new.padded_vocab_size, new.make_vocab_size_divisible_by, new.vocab_size) == (padded, divisible_by, 250)
    assert new.tensor_model_parallel_size == tp and new.layernorm_epsilon == old.layernorm_epsilon


def test_resharding_unknown_vocab_never_records_the_padded_size_as_the_vocab():
    """A Megatron-LM run with a Hugging Face tokenizer records no true vocab: resharding keeps it unrecorded
    when the padded size stays, and refuses (asking for --vocab-size) when Megatron-LM's rule would change it."""
    cfg = CanonicalConfig(**{**BASE, "vocab_size": 256})  # what a source without a true vocab reads as
    old = args_from_canonical(cfg, tp=2)
    old.vocab_size = None
    new = resharded_args(old, cfg, vocab_known=False, tp=1, pp=2, vpp=1, divisible_by=128)
    assert new.vocab_size is None and new.padded_vocab_size == 256
    with pytest.raises(ValueError, match=r"no true vocab size.*--vocab-size"):
        resharded_args(old, cfg, vocab_known=False, tp=4, pp=1, vpp=1, divisible_by=128)
