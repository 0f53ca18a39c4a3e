"""Canonical config <-> the `args` Namespace stored in Megatron checkpoints, through one two-way table.

The Namespace carries what Megatron-LM's `pretrain_gpt.py --use-checkpoint-args` reads (shape, parallel sizes,
GQA, rope, biases, normalization, padded vocab) plus `checkpoint_version`-era bookkeeping, so Megatron-LM itself can
resume from what we write. Vocab padding follows Megatron-LM: a multiple of `make_vocab_size_divisible_by * TP`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig
from megatron_bridge.layout import Arch
from megatron_bridge.param_kinds import Shape


@dataclass(frozen=True)
class ArgField:
    """One `(canonical_key, megatron_arg)` pair; `to_args`/`from_args` convert representations."""

    canonical: str
    arg: str
    to_args: Optional[Callable[[Any], Any]] = None
    from_args: Optional[Callable[[Any], Any]] = None


CONFIG_TABLE = [
    ArgField("num_layers", "num_layers"),
    ArgField("hidden_size", "hidden_size"),
    ArgField("intermediate_size", "ffn_hidden_size"),
    ArgField("num_attention_heads", "num_attention_heads"),
    ArgField("num_key_value_heads", "num_query_groups"),
    ArgField("head_dim", "kv_channels"),
    ArgField("max_position_embeddings", "max_position_embeddings"),
    ArgField("rms_norm_eps", "norm_epsilon"),
    ArgField("rope_theta", "rotary_base", to_args=lambda v: int(v) if float(v).is_integer() else v,
             from_args=float),
    ArgField("tie_word_embeddings", "untie_embeddings_and_output_weights", to_args=lambda v: not v,
             from_args=lambda v: not v),
    ArgField("qk_norm", "qk_layernorm"),
    ArgField("vocab_size", "vocab_size"),
]

# Fixed facts of a Llama-shaped model in Megatron-LM's vocabulary.
FIXED_ARGS = dict(
    position_embedding_type="rope", rotary_percent=1.0, rotary_interleaved=False, use_rotary_position_embeddings=True,
    normalization="RMSNorm", apply_layernorm_1p=False, apply_residual_connection_post_layernorm=False,
    squared_relu=False, bias_gelu_fusion=False, add_position_embedding=False,
    hidden_dropout=0.0, attention_dropout=0.0, apply_query_key_layer_scaling=False,
    attention_softmax_in_fp32=True, init_method_std=0.02, num_experts=None, encoder_num_layers=None,
    decoder_num_layers=None, num_layers_per_virtual_pipeline_stage=None, data_parallel_size=1,
    consumed_train_samples=0, consumed_valid_samples=0, ckpt_format="torch", use_dist_ckpt=False,
    fp32_residual_connection=False, sequence_parallel=False,
    context_parallel_size=1, expert_model_parallel_size=1, multi_latent_attention=False,
)


# The gated MLP's activation (canonical hidden_act) in Megatron-LM's flags. Both are gated linear units; the
# tanh-approximated GELU is Megatron's `openai_gelu` (megatron.core.transformer.utils.openai_gelu). Megatron-LM's
# own config-from-args copies `gated_linear_unit` but reads `openai_gelu` only in its legacy model, so a Gemma
# checkpoint resumed by upstream pretrain_gpt needs activation_func=openai_gelu set there (our builder does it).
ACTIVATION_ARGS = {
    "silu": dict(swiglu=True, openai_gelu=False, gated_linear_unit=True),
    "gelu_pytorch_tanh": dict(swiglu=False, openai_gelu=True, gated_linear_unit=True),
}


def activation_from_args(a: argparse.Namespace) -> str:
    """The canonical hidden_act of a checkpoint's args; raises for an MLP the canonical decoder does not have."""
    if getattr(a, "swiglu", False):
        return "silu"
    if getattr(a, "gated_linear_unit", False) and getattr(a, "openai_gelu", False):
        return "gelu_pytorch_tanh"
    raise ValueError("swiglu=False and no gated tanh-GELU (gated_linear_unit + openai_gelu): the canonical decoder "
                     "has a gated SiLU or gated tanh-GELU MLP only")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def llama3_rope_scaling_factor(cfg: CanonicalConfig) -> Optional[float]:
    """The factor megatron-core can express, or raise naming what it cannot (it fixes the other parameters)."""
    rs = cfg.rope_scaling
    if not rs:
        return None
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if rs.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling type {rs.get('rope_type')!r} has no megatron-core equivalent "
                         f"(only llama3 scaling is supported)")
    off = {k: rs.get(k) for k, v in fixed.items() if float(rs.get(k, v)) != v}
    if off:
        raise ValueError(f"megatron-core's llama3 rope scaling fixes {fixed}; this model has {off}")
    return float(rs["factor"])


def args_from_canonical(cfg: CanonicalConfig, *, tp: int = 1, pp: int = 1, vpp: int = 1,
                        make_vocab_size_divisible_by: int = 128, transformer_impl: str = "local",
                        seq_length: Optional[int] = None) -> argparse.Namespace:
    a = argparse.Namespace(**FIXED_ARGS, **ACTIVATION_ARGS[cfg.hidden_act])
    for f in CONFIG_TABLE:
        v = getattr(cfg, f.canonical)
        setattr(a, f.arg, f.to_args(v) if f.to_args else v)
    a.group_query_attention = cfg.num_key_value_heads != cfg.num_attention_heads
    a.add_qkv_bias = cfg.qkv_bias
    a.add_bias_linear = cfg.o_bias or cfg.mlp_bias
    factor = llama3_rope_scaling_factor(cfg)
    a.use_rope_scaling = factor is not None
    a.rope_scaling_factor = factor if factor is not None else 8.0
    a.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    a.padded_vocab_size = padded_vocab_size(cfg.vocab_size, tp, make_vocab_size_divisible_by)
    a.tensor_model_parallel_size = tp
    a.pipeline_model_parallel_size = pp
    a.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    if vpp > 1:
        a.num_layers_per_virtual_pipeline_stage = cfg.num_layers // (pp * vpp)
    a.world_size = tp * pp
    a.seq_length = a.encoder_seq_length = seq_length or min(cfg.max_position_embeddings, 4096)
    dtype = cfg.torch_dtype
    a.params_dtype = dtype
    a.bf16 = dtype == torch.bfloat16
    a.fp16 = dtype == torch.float16
    a.transformer_impl = "transformer_engine" if transformer_impl == "te" else transformer_impl
    return a


def canonical_from_args(a: argparse.Namespace, base: Optional[CanonicalConfig] = None) -> CanonicalConfig:
    """The canonical config of a Megatron checkpoint; `base` (recorded at import) fills what args cannot say."""
    if getattr(a, "normalization", "RMSNorm") != "RMSNorm":
        raise ValueError(f"normalization={a.normalization!r}: the canonical decoder uses RMSNorm")
    hidden_act = activation_from_args(a)
    if getattr(a, "position_embedding_type", "rope") != "rope":
        raise ValueError(f"position_embedding_type={a.position_embedding_type!r}: only rope is supported")
    if getattr(a, "num_experts", None):
        raise ValueError(f"num_experts={a.num_experts}: mixture-of-experts checkpoints are not supported")
    values = base.to_dict() if base else {}
    values["hidden_act"] = hidden_act
    for f in CONFIG_TABLE:
        v = getattr(a, f.arg, None)
        if v is None:
            continue
        values[f.canonical] = f.from_args(v) if f.from_args else v
    if not getattr(a, "group_query_attention", False):
        values["num_key_value_heads"] = a.num_attention_heads
    if values.get("head_dim") is None:
        values["head_dim"] = a.hidden_size // a.num_attention_heads
    if values.get("vocab_size") is None:
        values["vocab_size"] = a.padded_vocab_size
    bias_linear = bool(getattr(a, "add_bias_linear", False))
    qkv_bias = bool(getattr(a, "add_qkv_bias", False)) or bias_linear
    if base is None:
        values.update(qkv_bias=qkv_bias, o_bias=bias_linear, mlp_bias=bias_linear)
    elif (base.qkv_bias and not qkv_bias) or ((base.o_bias or base.mlp_bias) and not bias_linear):
        raise ValueError("checkpoint args lack biases its recorded config has")
    if getattr(a, "use_rope_scaling", False):
        if not (base and base.rope_scaling and base.rope_scaling.get("factor") == a.rope_scaling_factor):
            values["rope_scaling"] = {"rope_type": "llama3", "factor": float(a.rope_scaling_factor),
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    elif base is None:
        values["rope_scaling"] = None
    dtype = getattr(a, "params_dtype", None)
    if base is None:
        values["dtype"] = str(dtype).replace("torch.", "") if dtype is not None else (
            "bfloat16" if getattr(a, "bf16", False) else "float16" if getattr(a, "fp16", False) else "float32")
    values.setdefault("extra", {})
    return CanonicalConfig.from_dict(values)


def arch_from_args(a: argparse.Namespace) -> Arch:
    return Arch(qkv_bias=bool(getattr(a, "add_qkv_bias", False) or getattr(a, "add_bias_linear", False)),
                linear_bias=bool(getattr(a, "add_bias_linear", False)),
                qk_layernorm=bool(getattr(a, "qk_layernorm", False)),
                untie=bool(getattr(a, "untie_embeddings_and_output_weights", False)))


def shape_from_args(a: argparse.Namespace, vocab_size: int) -> Shape:
    ng = a.num_query_groups if getattr(a, "group_query_attention", False) else a.num_attention_heads
    hd = getattr(a, "kv_channels", None) or a.hidden_size // a.num_attention_heads
    return Shape(num_heads=a.num_attention_heads, num_groups=ng, head_dim=hd, vocab_size=vocab_size,
                 padded_vocab_size=a.padded_vocab_size)


def parallel_sizes(a: argparse.Namespace) -> tuple[int, int, int]:
    vpp = getattr(a, "virtual_pipeline_model_parallel_size", None) or 1
    return a.tensor_model_parallel_size, a.pipeline_model_parallel_size, vpp
