"""Qwen2 and Qwen2.5: Llama with q/k/v bias that is always on (there is no switch), and no o_proj or MLP bias.

To Llama this becomes `attention_bias` with a zero o_proj bias, since Llama's switch covers o_proj too; back to
Qwen2 that o_proj bias must be zero (it is dropped), else the conversion is refused. A model without q/k/v bias
gets zero ones. Sliding-window attention (`use_sliding_window: true`) is refused.
"""
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import refuse_sliding_window
from checkpoint_tools.families.config_table import fields_without
from checkpoint_tools.families.family import Family

FAMILY = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    classifier="Qwen2ForSequenceClassification",
    config_fields=fields_without(llama.CONFIG, "attention_bias", "mlp_bias"),
    tensors=llama.TENSORS,
    constants={"qkv_bias": True, "o_bias": False, "mlp_bias": False},
    own_keys={"use_sliding_window": False, "sliding_window": None},
    passthrough_keys=frozenset({"max_window_layers", "layer_types"}),  # inert without a window (checked)
    drop_tensors=llama.DROP,
    check_hf_config=refuse_sliding_window,
    aliases=("qwen", "qwen2.5", "qwen25"),
)
