"""Qwen3 (dense): Llama plus per-head q/k RMSNorm (`q_norm`/`k_norm` over head_dim, before rope), always on.

`LlamaForCausalLM` has no such norm, so Qwen3 -> Llama is refused naming it (the llama table's check); Megatron
expresses it as `qk_layernorm`. `attention_bias` covers q/k/v and o as in Llama; the MLP has no bias.
"""
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import refuse_sliding_window
from checkpoint_tools.families.config_table import fields_without
from checkpoint_tools.families.family import Family

FAMILY = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    classifier="Qwen3ForSequenceClassification",
    config_fields=fields_without(llama.CONFIG, "mlp_bias"),
    tensors=llama.TENSORS,
    constants={"qk_norm": True, "mlp_bias": False},
    own_keys={"use_sliding_window": False, "sliding_window": None},
    passthrough_keys=frozenset({"max_window_layers", "layer_types"}),  # inert without a window (checked)
    bias_groups=(("qkv_bias", "o_bias"),),
    drop_tensors=llama.DROP,
    check_hf_config=refuse_sliding_window,
)
