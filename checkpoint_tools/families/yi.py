"""Yi (01.AI), original remote-code layout (`model_type: Yi`, `YiForCausalLM`): Llama with the two layer norms
named `ln1` (before attention) and `ln2` (before the MLP). Yi checkpoints re-published as `model_type: llama` are
read by the llama table directly.
"""
from checkpoint_tools.canonical import EMBED, FINAL_NORM, LAYER_TENSORS as L, LM_HEAD
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import rope_scaling_limited_to
from checkpoint_tools.families.config_table import fields_without
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import Rename

FAMILY = Family(
    model_type="Yi",
    architecture="YiForCausalLM",
    config_fields=fields_without(llama.CONFIG, "attention_bias", "mlp_bias"),
    tensors=[Rename(L["input_norm"], "model.layers.{i}.ln1.weight"),
             Rename(L["post_attn_norm"], "model.layers.{i}.ln2.weight"),
             *(Rename(n, n) for n in (EMBED, FINAL_NORM, LM_HEAD, L["q"], L["k"], L["v"], L["o"], L["gate"],
                                      L["up"], L["down"]))],
    legacy_config=True,
    drop_tensors=llama.DROP,
    check_canonical=rope_scaling_limited_to("Yi"),  # YiForCausalLM has plain rope only
    aliases=("yi",),
)
