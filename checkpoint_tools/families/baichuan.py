"""Baichuan2-7B (remote code, no transformers class; `model_type: baichuan`): Llama math with two twists.

    W_pack   [3 * hidden, hidden] = cat(q, k, v) along dim 0 (BaichuanAttention unflattens the output into 3)
    lm_head  NormHead: logits use the head's rows divided by their L2 norm (F.normalize(w, dim=-1)); canonical
             and Llama therefore get the normalized head (computed in float64, cast to the dtype; rows already of
             unit norm to two eps of the dtype are kept as they are, so repeated conversions are bit-stable)

Back to Baichuan2 the head is written as it is, and must be row-normalized (else NormHead would change the
model: refused). The rotary base is fixed at 10000 in Baichuan2's code, there is no GQA and no bias.
Baichuan2-13B uses ALiBi instead of rope; its config has no `max_position_embeddings`, which is how it is
recognised and refused. (Baichuan-1 shares the model_type but has a plain head: this table assumes Baichuan2.)
"""
from __future__ import annotations

from checkpoint_tools.canonical import FINAL_NORM, LAYER_TENSORS as L
from checkpoint_tools.families import llama
from checkpoint_tools.families.config_table import ConfigField, fields_without
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.mappings import EmbeddingHead, Fold, Fused, Rename
from checkpoint_tools.lazy_torch import torch

_ROWS = 4096  # rows normalized per step: float64 copies of a 125k x 4096 head would need 4 GB at once


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([c.to(torch.float64).norm(dim=-1) for c in w.split(_ROWS)]) if len(w) else w.new_zeros(0)


def _unit(norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A row normalized in float64 and rounded to the dtype is within eps/2 of unit norm; F.normalize in float32 on
    # 4096-wide rows lands within ~2.5 eps. Two eps keeps our own output (bit-stable) and is far below any real head.
    return (norms - 1).abs() <= 2 * torch.finfo(dtype).eps


def _normalize(w: torch.Tensor, ctx) -> torch.Tensor:
    if w.is_meta:
        return w
    out = []
    for c in w.split(_ROWS):
        n = c.to(torch.float64).norm(dim=-1, keepdim=True)
        normed = (c.to(torch.float64) / n.clamp_min(1e-12)).to(w.dtype)
        out.append(torch.where(_unit(n, w.dtype), c, normed))
    return torch.cat(out)


def _require_normalized(w: torch.Tensor, ctx) -> torch.Tensor:
    if not w.is_meta:
        bad = (~_unit(_row_norms(w), w.dtype)).nonzero()
        if len(bad):
            raise ValueError(f"Baichuan2's NormHead normalizes every lm_head row, but {len(bad)} rows of this head "
                             f"are not unit-norm (first: row {int(bad[0])}); it cannot be expressed, so nothing was "
                             f"written")
    return w


NORM_HEAD = Fold(_normalize, _require_normalized)


def _check_hf(hf: dict) -> None:
    if "max_position_embeddings" not in hf:
        raise ValueError("this Baichuan config has no max_position_embeddings: it is the Baichuan2-13B layout, "
                         "whose attention uses ALiBi position biases instead of rope. ALiBi cannot be expressed by "
                         "the canonical (rope) decoder, Llama or Megatron's GPT model; nothing was converted")


FAMILY = Family(
    model_type="baichuan",
    architecture="BaichuanForCausalLM",
    config_fields=[*fields_without(llama.CONFIG, "attention_bias", "mlp_bias", "head_dim", "num_key_value_heads"),
                   ConfigField(None, "num_key_value_heads", default=lambda hf: hf["num_attention_heads"]),
                   ConfigField(None, "head_dim", default=lambda hf: hf["hidden_size"] // hf["num_attention_heads"])],
    tensors=[
        EmbeddingHead(head_fold=NORM_HEAD),
        Rename(FINAL_NORM, FINAL_NORM),
        Fused("model.layers.{i}.self_attn.W_pack.weight", (L["q"], L["k"], L["v"])),
        *(Rename(L[r], L[r]) for r in ("input_norm", "post_attn_norm", "o", "gate", "up", "down")),
    ],
    passthrough_keys=frozenset({"model_max_length", "z_loss_weight", "gradient_checkpointing", "tokenizer_class",
                                "_from_model_config"}),
    rope_keys=False,
    legacy_config=True,
    drop_tensors=llama.DROP,
    check_hf_config=_check_hf,
    aliases=("baichuan2",),
)
