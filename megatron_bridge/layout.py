"""Where each canonical tensor lives in a Megatron checkpoint: parameter names, split kinds and pipeline stages.

One table (`LAYER_PARAMS`, `GLOBAL_PARAMS`) pairs each Megatron parameter with its Transformer Engine name, the
canonical tensors it is made of, and its TP split kind. Pipeline placement is a pure global <-> local layer map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from checkpoint_tools.canonical import EMBED, FINAL_NORM, LAYER_TENSORS, LM_HEAD
from megatron_bridge.param_kinds import GATED_MLP, QKV_KIND, REPLICATED, ROW, VOCAB, Kind

NAME_STYLES = ("local", "te")


@dataclass(frozen=True)
class Arch:
    """Which optional parameters a Megatron model has (from its args)."""

    qkv_bias: bool          # add_qkv_bias or add_bias_linear
    linear_bias: bool       # add_bias_linear: linear_proj, linear_fc1, linear_fc2 biases
    qk_layernorm: bool
    untie: bool             # untie_embeddings_and_output_weights


@dataclass(frozen=True)
class Param:
    local: str
    te: str
    roles: tuple[str, ...]  # canonical roles (keys of LAYER_TENSORS) or canonical names for global params
    kind: Kind
    present: Callable[[Arch], bool] = lambda a: True

    def name(self, style: str) -> str:
        return self.te if style == "te" else self.local


LAYER_PARAMS = [
    Param("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", ("input_norm",), REPLICATED),
    Param("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight", ("q", "k", "v"), QKV_KIND),
    Param("self_attention.linear_qkv.bias", "self_attention.linear_qkv.bias", ("q_bias", "k_bias", "v_bias"),
          QKV_KIND, lambda a: a.qkv_bias),
    Param("self_attention.q_layernorm.weight", "self_attention.q_layernorm.weight", ("q_norm",), REPLICATED,
          lambda a: a.qk_layernorm),
    Param("self_attention.k_layernorm.weight", "self_attention.k_layernorm.weight", ("k_norm",), REPLICATED,
          lambda a: a.qk_layernorm),
    Param("self_attention.linear_proj.weight", "self_attention.linear_proj.weight", ("o",), ROW),
    Param("self_attention.linear_proj.bias", "self_attention.linear_proj.bias", ("o_bias",), REPLICATED,
          lambda a: a.linear_bias),
    Param("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", ("post_attn_norm",), REPLICATED),
    Param("mlp.linear_fc1.weight", "mlp.linear_fc1.weight", ("gate", "up"), GATED_MLP),
    Param("mlp.linear_fc1.bias", "mlp.linear_fc1.bias", ("gate_bias", "up_bias"), GATED_MLP,
          lambda a: a.linear_bias),
    Param("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("down",), ROW),
    Param("mlp.linear_fc2.bias", "mlp.linear_fc2.bias", ("down_bias",), REPLICATED, lambda a: a.linear_bias),
]

# Transformer Engine modules carry serialized FP8 metadata; we write None (TE accepts it) and drop it on read.
TE_EXTRA_STATE = [
    "self_attention.linear_qkv._extra_state", "self_attention.core_attention._extra_state",
    "self_attention.linear_proj._extra_state", "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state",
]

EMBEDDING = Param("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", (EMBED,), VOCAB)
FINAL_LAYERNORM = Param("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", (FINAL_NORM,),
                        REPLICATED)
OUTPUT_LAYER = Param("output_layer.weight", "output_layer.weight", (LM_HEAD,), VOCAB)


def layer_prefix(local_index: int) -> str:
    return f"decoder.layers.{local_index}."


def canonical_layer_names(roles: tuple[str, ...], layer: int) -> list[str]:
    return [LAYER_TENSORS[r].format(i=layer) for r in roles]


def check_pipeline(num_layers: int, pp: int, vpp: int = 1) -> None:
    if pp < 1 or vpp < 1:
        raise ValueError(f"PP={pp} and VPP={vpp} must be positive")
    if num_layers % (pp * vpp):
        valid = [p for p in range(1, num_layers + 1) if num_layers % (p * vpp) == 0]
        raise ValueError(f"num_layers={num_layers} is not divisible by PP*VPP={pp}*{vpp}; "
                         f"with VPP={vpp} use PP in {valid}")
    if vpp > 1 and pp < 2:
        raise ValueError(f"VPP={vpp} needs PP >= 2 (Megatron interleaves virtual stages across pipeline ranks)")


def stage_layers(num_layers: int, pp: int, vpp: int = 1) -> dict[tuple[int, int], list[int]]:
    """(pp_rank, vpp_chunk) -> the global layer indices it holds, in local order.

    Chunk v of stage p holds global layers starting at (v * PP + p) * layers_per_chunk; local numbering restarts
    at 0 in every chunk.
    """
    check_pipeline(num_layers, pp, vpp)
    per = num_layers // (pp * vpp)
    return {(p, v): list(range((v * pp + p) * per, (v * pp + p + 1) * per)) for p in range(pp) for v in range(vpp)}


def is_first(p: int, v: int) -> bool:
    return p == 0 and v == 0


def is_last(p: int, v: int, pp: int, vpp: int) -> bool:
    return p == pp - 1 and v == vpp - 1


def global_params(arch: Arch, p: int, v: int, pp: int, vpp: int) -> list[tuple[Param, Optional[str]]]:
    """Non-layer params on chunk (p, v), each with the canonical name it comes from.

    With tied embeddings the output layer exists only when it sits on another stage than the embedding (PP > 1);
    it is then a copy of the embedding.
    """
    out: list[tuple[Param, Optional[str]]] = []
    if is_first(p, v):
        out.append((EMBEDDING, EMBED))
    if is_last(p, v, pp, vpp):
        out.append((FINAL_LAYERNORM, FINAL_NORM))
        if arch.untie:
            out.append((OUTPUT_LAYER, LM_HEAD))
        elif not is_first(p, v):
            out.append((OUTPUT_LAYER, EMBED))
    return out
