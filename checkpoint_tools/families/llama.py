"""Llama 1/2/3/3.x (and Llama-shaped checkpoints such as SmolLM2): the canonical form itself.

Canonical tensor names are Llama's, so the tensor table is the identity; the config table maps HF keys to
canonical ones. Llama ties q/k/v/o biases to one switch (`attention_bias`: a model with q/k/v bias only, as Qwen2,
gets a zero o_proj bias) and has no q/k norm. `LlamaForCausalLM` runs any `hidden_act`, so Gemma's tanh-GELU gate
is expressible here.
"""
from checkpoint_tools.canonical import LAYER_TENSORS, CanonicalConfig, EMBED, FINAL_NORM, LM_HEAD, SCORE
from checkpoint_tools.families.config_table import ConfigField
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import Rename


def _check_canonical(cfg: CanonicalConfig) -> None:
    if cfg.qk_norm:
        raise ValueError("LlamaForCausalLM has no per-head q/k RMSNorm (qk_norm, as in Qwen3); it cannot be "
                         "expressed, so nothing was written: convert to Megatron (q/k layernorm) or to qwen3 instead")


def _check_hf(hf: dict) -> None:
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} changes the math of LlamaForCausalLM; only 1 is "
                         f"supported")


CONFIG = [
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("intermediate_size", "intermediate_size"),
    ConfigField("num_hidden_layers", "num_layers"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    ConfigField("num_key_value_heads", "num_key_value_heads", default=lambda hf: hf["num_attention_heads"]),
    ConfigField("head_dim", "head_dim", default=lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
    ConfigField("max_position_embeddings", "max_position_embeddings", default=2048),
    ConfigField("rms_norm_eps", "rms_norm_eps", default=1e-6),
    ConfigField("tie_word_embeddings", "tie_word_embeddings", default=False),
    ConfigField("attention_bias", "qkv_bias", default=False),
    ConfigField("attention_bias", "o_bias", default=False),
    ConfigField("mlp_bias", "mlp_bias", default=False),
    ConfigField("hidden_act", "hidden_act", default="silu"),
    ConfigField("bos_token_id", "bos_token_id", default=None),
    ConfigField("eos_token_id", "eos_token_id", default=None),
    ConfigField("pad_token_id", "pad_token_id", default=None),
]

# The identity table; Llama-named families (Mistral, Qwen2/3, InternLM3) reuse it. `score.weight` exists only in a
# sequence-classification (reward) checkpoint, in place of lm_head.weight.
TENSORS = [Rename(n, n) for n in [EMBED, FINAL_NORM, LM_HEAD, SCORE, *LAYER_TENSORS.values()]]
DROP = (r"\.rotary_emb\.inv_freq$",)

FAMILY = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    classifier="LlamaForSequenceClassification",
    config_fields=CONFIG,
    tensors=TENSORS,
    passthrough_keys=frozenset({"pretraining_tp", "max_sequence_length"}),  # the latter: Llama-1 configs, unread
    bias_groups=(("qkv_bias", "o_bias"),),
    drop_tensors=DROP,
    check_hf_config=_check_hf,
    check_canonical=_check_canonical,
)
