"""Mistral (7B v0.1/v0.2/v0.3, Nemo): Llama's tensors and config without biases, plus a sliding window.

A window shorter than the context changes attention past it, which neither canonical nor Llama can express: such a
config is refused by name. v0.2 and later set `sliding_window: null` and convert.
"""
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import refuse_sliding_window
from checkpoint_tools.families.config_table import fields_without
from checkpoint_tools.families.family import Family

FAMILY = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    classifier="MistralForSequenceClassification",
    config_fields=fields_without(llama.CONFIG, "attention_bias", "mlp_bias"),
    tensors=llama.TENSORS,
    own_keys={"sliding_window": None},  # MistralConfig defaults to 4096: write the absence of a window explicitly
    drop_tensors=llama.DROP,
    check_hf_config=refuse_sliding_window,
)
