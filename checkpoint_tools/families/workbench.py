"""The workbench model (checkpoint_tools/modeling_workbench.py): the canonical form with a switch for every option.

Tensor names are canonical (Llama's identity table). The config differs from Llama's only where Llama ties two
options together or lacks one: `attention_bias` (q/k/v) and `attention_out_bias` (o_proj) are separate switches,
and `qk_norm` says Qwen3's per-head q/k RMSNorm is there. So every family converts here without zero-filled biases
and back bit-exact. `attention_backend` is a runtime choice, carried as it is.
"""
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import refuse_sliding_window
from checkpoint_tools.families.config_table import ConfigField, fields_without
from checkpoint_tools.families.family import Family

CONFIG = [
    *fields_without(llama.CONFIG, "attention_bias"),
    ConfigField("attention_bias", "qkv_bias", default=False),
    ConfigField("attention_out_bias", "o_bias", default=False),
    ConfigField("qk_norm", "qk_norm", default=False),
]

FAMILY = Family(
    model_type="workbench",
    architecture="WorkbenchForCausalLM",
    classifier="WorkbenchForSequenceClassification",
    config_fields=CONFIG,
    tensors=llama.TENSORS,
    passthrough_keys=frozenset({"attention_backend"}),
    drop_tensors=llama.DROP,
    check_hf_config=refuse_sliding_window,
)
