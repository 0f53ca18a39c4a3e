"""InternLM3 (8B): a Llama decoder with its own config spellings; transformers runs it as `LlamaForCausalLM`.

Remote-code configs say `qkv_bias` (q/k/v) and `bias` (o_proj and MLP); transformers' `InternLM3Config` maps them to
`attention_bias` and `mlp_bias` and requires them equal, so when any bias is on all of them are written (zeros where
the model has none). Its dynamic-NTK rope scaling goes to Llama; Megatron has no dynamic NTK and refuses it.
"""
from checkpoint_tools.families import llama
from checkpoint_tools.families.config_table import ConfigField, fields_without
from checkpoint_tools.families.family import Family

FAMILY = Family(
    model_type="internlm3",
    architecture="InternLM3ForCausalLM",
    config_fields=[*fields_without(llama.CONFIG, "attention_bias", "mlp_bias"),
                   ConfigField("attention_bias", "qkv_bias", default=False, aliases=("qkv_bias",)),
                   ConfigField("mlp_bias", "o_bias", default=False, aliases=("bias",)),
                   ConfigField("mlp_bias", "mlp_bias", default=False, aliases=("bias",))],
    tensors=llama.TENSORS,
    passthrough_keys=frozenset({"attn_implementation"}),
    bias_groups=(("qkv_bias", "o_bias", "mlp_bias"),),
    drop_tensors=llama.DROP,
)
