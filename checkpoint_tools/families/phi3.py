"""Phi-3 (mini/small-style dense, Phi-3.5-mini): Llama with fused projections.

    qkv_proj     = cat(q, k, v) along the output dim   [(nq + 2*nkv) * hd, hidden]
    gate_up_proj = cat(gate, up) along the output dim  [2 * intermediate, hidden]

No biases. `resid_pdrop`/`embd_pdrop` are dropout rates (no effect on weights or inference). A sliding window
shorter than the context (Phi-3-mini-4k's 2047) and partial rotary (`partial_rotary_factor` < 1) are refused by
name. LongRoPE scaling is carried to Llama (which runs it); Megatron has no LongRoPE and refuses it.
"""
from checkpoint_tools.canonical import EMBED, FINAL_NORM, LAYER_TENSORS as L, LM_HEAD, SCORE
from checkpoint_tools.families import llama
from checkpoint_tools.families.checks import refuse_sliding_window, rope_scaling_limited_to
from checkpoint_tools.families.config_table import fields_without
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import Fused, Rename

_SCALED_ROPE = ("longrope", "yarn", "llama3")


def _check_hf(hf: dict) -> None:
    refuse_sliding_window(hf)
    if hf.get("attention_bias"):  # some Phi-3.5 configs carry the key; Phi-3's projections have no bias
        raise ValueError("attention_bias=true: Phi-3's attention projections have no bias in its code; this config "
                         "does not describe a Phi-3 checkpoint")


def _finish(values: dict, hf: dict) -> None:
    # Phi-3 keeps the pretraining length at the top level; transformers moves it into the rope dict, and so do we.
    rs = values.get("rope_scaling")
    if rs and rs.get("rope_type") in _SCALED_ROPE and "original_max_position_embeddings" in hf:
        values["rope_scaling"] = {**rs, "original_max_position_embeddings": hf["original_max_position_embeddings"]}


FAMILY = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    classifier="Phi3ForSequenceClassification",
    config_fields=fields_without(llama.CONFIG, "attention_bias", "mlp_bias"),
    tensors=[
        *(Rename(n, n) for n in (EMBED, FINAL_NORM, LM_HEAD, SCORE, L["input_norm"], L["post_attn_norm"], L["o"],
                                 L["down"])),
        Fused("model.layers.{i}.self_attn.qkv_proj.weight", (L["q"], L["k"], L["v"])),
        Fused("model.layers.{i}.mlp.gate_up_proj.weight", (L["gate"], L["up"])),
    ],
    passthrough_keys=frozenset({"resid_pdrop", "embd_pdrop", "attention_bias"}),
    own_keys={"sliding_window": None,
              "original_max_position_embeddings": lambda c: (c.rope_scaling or {}).get(
                  "original_max_position_embeddings", c.max_position_embeddings)},
    drop_tensors=llama.DROP,
    check_hf_config=_check_hf,
    check_canonical=rope_scaling_limited_to("phi3", "longrope"),  # Phi3Config validates exactly these
    finish_config=_finish,
)
