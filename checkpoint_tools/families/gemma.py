"""Gemma (1): Llama-shaped, with three things folded into the weights on the way to canonical.

    norms      Gemma's RMSNorm multiplies by (1 + w) in float32: canonical w' = 1 + w (in float32, then the dtype)
    embedding  Gemma scales embeddings by sqrt(hidden_size) (rounded to the dtype): canonical E' = E * scale
    head       Gemma ties lm_head to the unscaled E, so canonical unties: lm_head = E, embed = E * scale

The MLP gate is tanh-approximated GELU (`gelu_pytorch_tanh`; transformers reads the legacy `"gelu"` the same way),
which canonical, `LlamaForCausalLM` and megatron-core (gated `openai_gelu`) all run. Back to Gemma the folds are
undone (w = w' - 1, E = E' / scale), exact up to that arithmetic; lm_head ties again when E' is exactly the scaled
head. Bidirectional attention (`use_bidirectional_attention`) is refused.
"""
from checkpoint_tools.canonical import FINAL_NORM, LAYER_TENSORS as L, SCORE
from checkpoint_tools.dtype_names import round_to_dtype
from checkpoint_tools.families import llama
from checkpoint_tools.families.config_table import ConfigField, fields_without
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import EmbeddingHead, Fold, Rename, scale_by
from checkpoint_tools.lazy_torch import torch

# (1 + w) computed in float32, as GemmaRMSNorm does
ONE_PLUS = Fold(lambda t, c: (t.to(torch.float32) + 1.0).to(t.dtype),
                lambda t, c: (t.to(torch.float32) - 1.0).to(t.dtype))


def _embed_scale(ctx) -> float:
    # GemmaTextScaledWordEmbedding: a float32 buffer sqrt(hidden_size), cast to the weights' dtype before multiplying
    # (rounded without torch for the usual dtypes: reading a config, `inspect`, asks whether the scale is 1)
    scale = round_to_dtype(ctx.cfg.hidden_size ** 0.5, ctx.cfg.dtype)
    if scale is None:
        scale = float(torch.tensor(ctx.cfg.hidden_size ** 0.5, dtype=torch.float32).to(ctx.cfg.torch_dtype))
    return scale


def _check_hf(hf: dict) -> None:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (use_bidirectional_attention=true) cannot be expressed by the "
                         "canonical causal decoder; nothing was converted")


NORMS = ("input_norm", "post_attn_norm")
FAMILY = Family(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    classifier="GemmaForSequenceClassification",
    config_fields=[*fields_without(llama.CONFIG, "mlp_bias", "hidden_act", "tie_word_embeddings"),
                   ConfigField("hidden_act", "hidden_act", default="gelu_pytorch_tanh",
                               to_canonical=lambda v: "gelu_pytorch_tanh" if v == "gelu" else v),
                   ConfigField("tie_word_embeddings", "tie_word_embeddings", default=True)],
    tensors=[
        EmbeddingHead(embed_fold=scale_by(_embed_scale)),
        Rename(FINAL_NORM, FINAL_NORM, ONE_PLUS),
        Rename(SCORE, SCORE),  # GemmaForSequenceClassification: a plain linear on the final (1 + w)-normed state
        *(Rename(L[r], L[r], ONE_PLUS) for r in NORMS),
        *(Rename(L[r], L[r]) for r in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "gate", "up",
                                       "down")),
    ],
    passthrough_keys=frozenset({"hidden_activation"}),  # legacy duplicate of hidden_act, ignored by transformers 5
    own_keys={"use_bidirectional_attention": None},
    constants={"mlp_bias": False},
    bias_groups=(("qkv_bias", "o_bias"),),
    drop_tensors=llama.DROP,
    check_hf_config=_check_hf,
)
