"""InternLM2 / InternLM2.5 (remote code, no transformers class): its own tensor names and a packed `wqkv`.

    wqkv  [nkv * (nq/nkv + 2) * hd, hidden], grouped per KV head as [q heads of the group, k, v] -- the layout
          InternLM2Attention unpacks with rearrange("b q (h gs d) -> b q h gs d", gs=nq/nkv + 2), and the same one
          Megatron's linear_qkv uses
    w1 / w3 / w2 = gate / up / down;  attention_norm / ffn_norm = input / post-attention norm;  output = lm_head

`bias` switches the wqkv and wo biases together (the MLP has none). head_dim is hidden_size / num_attention_heads in
InternLM2's code, so a model with another head_dim is refused.
"""
from checkpoint_tools.canonical import EMBED, FINAL_NORM, LAYER_TENSORS as L, LM_HEAD
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import rope_scaling_limited_to
from checkpoint_tools.families.config_table import ConfigField, fields_without
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import GroupedQKV, Rename

P = "model.layers.{i}."
FAMILY = Family(
    model_type="internlm2",
    architecture="InternLM2ForCausalLM",
    config_fields=[*fields_without(llama.CONFIG, "attention_bias", "mlp_bias", "head_dim"),
                   ConfigField(None, "head_dim", default=lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
                   ConfigField("bias", "qkv_bias", default=True),
                   ConfigField("bias", "o_bias", default=True)],
    tensors=[
        Rename(EMBED, "model.tok_embeddings.weight"), Rename(FINAL_NORM, "model.norm.weight"),
        Rename(LM_HEAD, "output.weight"),
        Rename(L["input_norm"], P + "attention_norm.weight"), Rename(L["post_attn_norm"], P + "ffn_norm.weight"),
        GroupedQKV(P + "attention.wqkv.weight", (L["q"], L["k"], L["v"])),
        GroupedQKV(P + "attention.wqkv.bias", (L["q_bias"], L["k_bias"], L["v_bias"])),
        Rename(L["o"], P + "attention.wo.weight"), Rename(L["o_bias"], P + "attention.wo.bias"),
        Rename(L["gate"], P + "feed_forward.w1.weight"), Rename(L["up"], P + "feed_forward.w3.weight"),
        Rename(L["down"], P + "feed_forward.w2.weight"),
    ],
    passthrough_keys=frozenset({"attn_implementation", "pretraining_tp"}),
    constants={"mlp_bias": False},
    bias_groups=(("qkv_bias", "o_bias"),),
    legacy_config=True,
    drop_tensors=llama.DROP,
    check_hf_config=llama.FAMILY.check_hf_config,  # pretraining_tp must be 1
    check_canonical=rope_scaling_limited_to("internlm2", "linear", "dynamic"),  # InternLM2's rotary classes
)
