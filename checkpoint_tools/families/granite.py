"""IBM Granite (3.x dense): Llama with four scalar multipliers, all folded into weights on the way to canonical.

    embedding_multiplier  h0 = embed(x) * m_e              -> canonical embed  = E * m_e
    attention_multiplier  scores = q.k * m_a (not 1/sqrt(d)) -> canonical q (and q bias) scaled by m_a * sqrt(d)
    residual_multiplier   h += block(h) * m_r               -> canonical o_proj and down_proj (and biases) * m_r
    logits_scaling        logits = head(h) / s              -> canonical lm_head = W / s

A tied Granite becomes untied in canonical when m_e != 1 or s != 1. Back to Granite the recorded multipliers (the
source config kept next to a Megatron checkpoint) are divided out again, exact up to that arithmetic; from a plain
Llama checkpoint, which has no place for them, the identity is written (multipliers 1, attention_multiplier
1/sqrt(head_dim)) and the weights stay as they are.
"""
from checkpoint_tools.canonical import FINAL_NORM, LAYER_TENSORS as L
from checkpoint_tools.families import llama
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import EmbeddingHead, Rename, divide_by, scale_by


def _get(key, default=1.0):
    return lambda ctx: float(ctx.hf.get(key, default))


# Llama's attention multiplies q.k by head_dim ** -0.5; Granite by attention_multiplier.
Q_SCALE = scale_by(lambda ctx: float(ctx.hf.get("attention_multiplier", 1.0)) / ctx.cfg.head_dim ** -0.5)
RESIDUAL = scale_by(_get("residual_multiplier"))

FAMILY = Family(
    model_type="granite",
    architecture="GraniteForCausalLM",
    config_fields=llama.CONFIG,
    tensors=[
        EmbeddingHead(embed_fold=scale_by(_get("embedding_multiplier")), head_fold=divide_by(_get("logits_scaling"))),
        Rename(FINAL_NORM, FINAL_NORM),
        Rename(L["q"], L["q"], Q_SCALE), Rename(L["q_bias"], L["q_bias"], Q_SCALE),
        *(Rename(L[r], L[r], RESIDUAL) for r in ("o", "o_bias", "down", "down_bias")),
        *(Rename(L[r], L[r]) for r in ("input_norm", "post_attn_norm", "k", "v", "k_bias", "v_bias", "gate", "up",
                                       "gate_bias", "up_bias")),
    ],
    own_keys={"embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
              "attention_multiplier": lambda cfg: cfg.head_dim ** -0.5},
    bias_groups=(("qkv_bias", "o_bias"),),
    drop_tensors=llama.DROP,
)
