"""Canonical config <-> the `args` Namespace stored in Megatron checkpoints, through two declarative tables.

- `CONFIG_TABLE`: each canonical field and every name Megatron-LM releases record it under (written under all,
  read from whichever is present).
- `UNEXPRESSIBLE_ARGS`: args that change the model's arithmetic in ways canonical cannot hold, with their harmless
  values; we write those, and refuse any other value on read, by name.

The Namespace carries what Megatron-LM's `pretrain_gpt.py --use-checkpoint-args` reads (shape, parallel sizes,
GQA, rope, biases, normalization, padded vocab) plus `checkpoint_version`-era bookkeeping, so Megatron-LM itself can
resume from what we write. Vocab padding follows Megatron-LM: a multiple of `make_vocab_size_divisible_by * TP`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from checkpoint_tools.canonical import CanonicalConfig
from checkpoint_tools.errors import CheckpointError

if TYPE_CHECKING:  # imported where used: reading args (`inspect`) needs neither torch nor the tensor kinds
    from megatron_bridge.layout import Arch
    from megatron_bridge.param_kinds import Shape


@dataclass(frozen=True)
class ArgField:
    """One canonical field and the `args` names Megatron-LM records it under.

    `arg` is the name we write and read first; `aliases` are the other names some Megatron-LM release uses for the
    same field (we write them too, and read whichever is present; two names that disagree are refused).
    `megatron_default` is what Megatron-LM computes with when a checkpoint records none of the names, used when
    nothing else (the recorded canonical config) says better.
    """

    canonical: str
    arg: str
    to_args: Optional[Callable[[Any], Any]] = None
    from_args: Optional[Callable[[Any], Any]] = None
    aliases: tuple[str, ...] = ()
    megatron_default: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.arg,) + self.aliases


CONFIG_TABLE = [
    ArgField("num_layers", "num_layers"),
    ArgField("hidden_size", "hidden_size"),
    ArgField("intermediate_size", "ffn_hidden_size"),
    ArgField("num_attention_heads", "num_attention_heads"),
    ArgField("num_key_value_heads", "num_query_groups"),
    ArgField("head_dim", "kv_channels"),
    ArgField("max_position_embeddings", "max_position_embeddings"),
    # Megatron-LM core_r0.16.0 generates its model flags from TransformerConfig: `--norm-epsilon` lands in
    # `layernorm_epsilon` there, in `norm_epsilon` in earlier releases and in tools/checkpoint's loaders.
    ArgField("rms_norm_eps", "layernorm_epsilon", aliases=("norm_epsilon",), megatron_default=1e-5),
    ArgField("rope_theta", "rotary_base", to_args=lambda v: int(v) if float(v).is_integer() else v,
             from_args=float, megatron_default=10000),
    ArgField("tie_word_embeddings", "untie_embeddings_and_output_weights", to_args=lambda v: not v,
             from_args=lambda v: not v),
    ArgField("qk_norm", "qk_layernorm"),
    ArgField("vocab_size", "vocab_size"),
]

FIELDS = {f.canonical: f for f in CONFIG_TABLE}


@dataclass(frozen=True)
class Unexpressible:
    """An `args` field that changes the model's arithmetic in a way the canonical decoder cannot hold.

    `harmless` lists the values that change nothing (the first is what we write); any other value is refused on
    read, by name, because converting would silently drop what it does.
    """

    arg: str
    harmless: tuple
    what: str


# Gone through megatron-core 0.16's TransformerConfig and Megatron-LM core_r0.16.0's model arguments and
# gpt_builders.py. Left out on purpose: fields that change only precision, kernels or training (dropouts, init,
# attention_softmax_in_fp32, fp32_residual_connection, fusions, recompute, fp8/fp4 recipes, qk_clip);
# apply_query_key_layer_scaling (megatron-core divides the scores by the layer number and the softmax multiplies it
# back: the same function); add_position_embedding and use_rotary_position_embeddings (superseded by
# position_embedding_type); the MLA-, MoE- and Mamba-only knobs, covered by the switch that enables them.
UNEXPRESSIBLE_ARGS = [
    Unexpressible("position_embedding_type", ("rope",), "positions other than rotary (learned, mrope, relative, none)"),
    Unexpressible("rotary_percent", (1.0,), "rotary embedding on part of each head only"),
    Unexpressible("rotary_interleaved", (False,), "interleaved (GPT-J style) rotary pairs instead of rotate-half"),
    Unexpressible("rotary_seq_len_interpolation_factor", (None, 1, 1.0), "linear rotary position interpolation"),
    Unexpressible("rope_type", (None, "rope"), "YaRN rotary embeddings"),
    Unexpressible("mrope_section", (None,), "multimodal rotary sections"),
    Unexpressible("no_rope_freq", (None,), "layers without rotary embeddings"),
    Unexpressible("normalization", ("RMSNorm",), "LayerNorm (with bias) instead of RMSNorm"),
    # --apply-layernorm-1p: `layernorm_zero_centered_gamma` in core_r0.16.0, `apply_layernorm_1p` before.
    Unexpressible("layernorm_zero_centered_gamma", (False,), "norms that scale by (1 + weight)"),
    Unexpressible("apply_layernorm_1p", (False,), "norms that scale by (1 + weight)"),
    Unexpressible("apply_residual_connection_post_layernorm", (False,), "the residual taken after the norm"),
    Unexpressible("qk_l2_norm", (False,), "L2-normalised queries and keys"),
    Unexpressible("attention_output_gate", (False,), "a gate on the attention output"),
    Unexpressible("softmax_type", ("vanilla",), "an off-by-one or learnable-sink attention softmax"),
    Unexpressible("softmax_scale", (None,), "an attention scale other than 1/sqrt(head_dim)"),
    Unexpressible("window_size", (None, (-1, -1), [-1, -1]), "sliding-window attention"),
    Unexpressible("window_attn_skip_freq", (None,), "sliding-window attention on some layers"),
    Unexpressible("experimental_attention_variant", (None,), "an experimental attention variant"),
    Unexpressible("linear_attention_freq", (None,), "linear-attention layers"),
    Unexpressible("multi_latent_attention", (False,), "multi-latent attention"),
    Unexpressible("num_experts", (None, 0), "mixture-of-experts MLPs"),
    Unexpressible("num_moe_experts", (None, 0), "mixture-of-experts MLPs"),
    Unexpressible("mtp_num_layers", (None, 0), "multi-token-prediction layers"),
    Unexpressible("squared_relu", (False,), "a squared-ReLU MLP"),
    Unexpressible("quick_geglu", (False,), "a quick-GELU gated MLP"),
    Unexpressible("glu_linear_offset", (0.0,), "an offset inside the gated linear unit"),
    Unexpressible("activation_func_clamp_value", (None,), "clamped MLP activations"),
    Unexpressible("is_hybrid_model", (False,), "Mamba hybrid layers"),
    Unexpressible("hybrid_override_pattern", (None,), "Mamba hybrid layers"),
    Unexpressible("heterogeneous_layers_config_path", (None,), "layers of different shapes"),
    Unexpressible("heterogeneous_layers_config_encoded_json", (None,), "layers of different shapes"),
    Unexpressible("spec", (None,), "a custom layer spec module, whose arithmetic is unknown here"),
    Unexpressible("use_legacy_models", (False,), "a megatron.legacy model (other parameter names and layout)"),
    # Not arithmetic, but the even split every stage map here assumes.
    Unexpressible("decoder_first_pipeline_num_layers", (None,), "an uneven first pipeline stage"),
    Unexpressible("decoder_last_pipeline_num_layers", (None,), "an uneven last pipeline stage"),
    Unexpressible("pipeline_model_parallel_layout", (None,), "a custom pipeline layout"),
    Unexpressible("account_for_embedding_in_pipeline_split", (False,), "an uneven pipeline split"),
    Unexpressible("account_for_loss_in_pipeline_split", (False,), "an uneven pipeline split"),
]


def check_expressible(a: argparse.Namespace, where: str = "checkpoint args") -> None:
    """Refuse, naming every offending field at once, args whose model the canonical decoder cannot reproduce."""
    view = vars(a)
    bad = [f"{u.arg}={view[u.arg]!r} ({u.what})" for u in UNEXPRESSIBLE_ARGS
           if u.arg in view and view[u.arg] not in u.harmless]
    if bad:
        raise ValueError(f"{where}: {'; '.join(bad)}: the canonical Llama-shaped decoder cannot express this, so "
                         f"converting would change the model's outputs; nothing was written. Convert a model "
                         f"without these features")


def legacy_arg_names(a: argparse.Namespace) -> argparse.Namespace:
    """A copy of `a` with pre-core_r0.16.0 spellings mapped as Megatron-LM itself maps them at load."""
    view = dict(vars(a))
    if "disable_bias_linear" in view and "add_bias_linear" not in view:
        view["add_bias_linear"] = not view["disable_bias_linear"]
    if "position_embedding_type" not in view and view.get("use_rotary_position_embeddings"):
        view["position_embedding_type"] = "rope"
    return argparse.Namespace(**view)


def read_arg(a: argparse.Namespace, f: ArgField) -> Any:
    """The value of `f` under whichever of its names `a` records (None if none); names that disagree raise."""
    found = {n: getattr(a, n) for n in f.names if getattr(a, n, None) is not None}
    if len(set(map(repr, found.values()))) > 1:
        raise ValueError(f"checkpoint args record {f.canonical} under several names that disagree: {found}; "
                         f"fix the args so they agree")
    return next(iter(found.values()), None)


# Written with every checkpoint; not read back. What Megatron-LM itself writes differs for some of these (it keeps
# its dropouts, initialisation, softmax precision ...) and none changes what a forward pass computes.
BOOKKEEPING_ARGS = dict(
    use_rotary_position_embeddings=True, add_position_embedding=False, bias_gelu_fusion=False,
    hidden_dropout=0.0, attention_dropout=0.0, apply_query_key_layer_scaling=False,
    attention_softmax_in_fp32=True, init_method_std=0.02, encoder_num_layers=None,
    num_layers_per_virtual_pipeline_stage=None, data_parallel_size=1,
    consumed_train_samples=0, consumed_valid_samples=0, ckpt_format="torch", use_dist_ckpt=False,
    fp32_residual_connection=False, sequence_parallel=False,
    context_parallel_size=1, expert_model_parallel_size=1,
)
# The fixed facts of a Llama-shaped model: the harmless value of each field that would change its arithmetic.
FIXED_ARGS = {**BOOKKEEPING_ARGS, **{u.arg: u.harmless[0] for u in UNEXPRESSIBLE_ARGS}}


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
    if cfg.is_classifier:
        # GPTModel ends in the LM head (output_layer); a score head would have to be dropped or invented
        raise ValueError(
            f"this is a sequence-classification (reward) model (score.weight [{cfg.num_labels}, {cfg.hidden_size}], "
            f"no lm_head); Megatron's GPTModel has no such head, so nothing was written. Keep it in Hugging Face form "
            f"(--to workbench, llama, qwen2, ...), or train from the causal LM checkpoint it came from")
    a = argparse.Namespace(**FIXED_ARGS, **ACTIVATION_ARGS[cfg.hidden_act])
    for f in CONFIG_TABLE:
        v = getattr(cfg, f.canonical)
        for name in f.names:
            setattr(a, name, f.to_args(v) if f.to_args else v)
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
    import torch

    dtype = cfg.torch_dtype
    a.params_dtype = dtype
    a.bf16 = dtype == torch.bfloat16
    a.fp16 = dtype == torch.float16
    a.transformer_impl = "transformer_engine" if transformer_impl == "te" else transformer_impl
    return a


def canonical_from_args(a: argparse.Namespace, base: Optional[CanonicalConfig] = None) -> CanonicalConfig:
    """The canonical config of a Megatron checkpoint; `base` (recorded at import) fills what args cannot say.

    Every field is read under every name Megatron-LM records it under; a field that changes the arithmetic in a way
    canonical cannot hold is refused by name (`UNEXPRESSIBLE_ARGS`).
    """
    a = legacy_arg_names(a)
    check_expressible(a)
    hidden_act = activation_from_args(a)
    values = base.to_dict() if base else {}
    values["hidden_act"] = hidden_act
    for f in CONFIG_TABLE:
        v = read_arg(a, f)
        if v is None:
            if base is not None or f.megatron_default is None:
                continue
            v = f.megatron_default
        values[f.canonical] = f.from_args(v) if f.from_args else v
    if not getattr(a, "group_query_attention", False):
        values["num_key_value_heads"] = a.num_attention_heads
    if values.get("head_dim") is None:
        values["head_dim"] = a.hidden_size // a.num_attention_heads
    true_vocab = true_vocab_from_args(a)
    if true_vocab is not None:
        values["vocab_size"] = true_vocab
    elif values.get("vocab_size") is None:  # unknown: every stored row is kept
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


# Megatron-LM's NullTokenizer appends an end-of-document id after the `--vocab-size` ids it is given.
_TOKENIZERS_WITH_EOD_AFTER_VOCAB = ("NullTokenizer", "NullMultimodalTokenizer")


def true_vocab_from_args(a: argparse.Namespace) -> Optional[int]:
    """The true (unpadded) vocab size the args record, or None: a Megatron-LM run with a Hugging Face or
    SentencePiece tokenizer records only `padded_vocab_size`."""
    v = getattr(a, "vocab_size", None)
    if v is None:
        return None
    return int(v) + 1 if getattr(a, "tokenizer_type", None) in _TOKENIZERS_WITH_EOD_AFTER_VOCAB else int(v)


def source_config(a: argparse.Namespace, where: str, base: Optional[CanonicalConfig] = None,
                  vocab_size: Optional[int] = None) -> tuple[CanonicalConfig, bool]:
    """The canonical config a Megatron checkpoint's args describe (`base` and `vocab_size` as given by the caller),
    and whether its vocab_size is the tokenizer's (recorded, given, or in args) or only the stored row count.
    `where` names the checkpoint in errors: the args alone do not say which one."""
    try:
        config = canonical_from_args(a, base)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if vocab_size is not None:
        config.vocab_size = vocab_size
    vocab_known = base is not None or vocab_size is not None or true_vocab_from_args(a) is not None
    if config.vocab_size > a.padded_vocab_size:
        raise CheckpointError(f"vocab_size={config.vocab_size} > padded_vocab_size={a.padded_vocab_size}")
    return config, vocab_known


def resharded_args(old: argparse.Namespace, cfg: CanonicalConfig, *, vocab_known: bool, tp: int, pp: int, vpp: int,
                   divisible_by: int, transformer_impl: str = "local") -> argparse.Namespace:
    """The source run's args with only the layout, and what depends on it, changed.

    The padded vocab follows Megatron-LM's rule (a multiple of `divisible_by` x TP) from the true vocab. When the
    true vocab is unknown, `cfg.vocab_size` is the stored row count: it is kept, and `vocab_size` stays unrecorded,
    so the output never claims the padded size is the vocab. If Megatron-LM's rule would then need a different
    padded size than the source's, nobody can tell which rows are real: refused, asking for --vocab-size.
    """
    fresh = args_from_canonical(cfg, tp=tp, pp=pp, vpp=vpp, make_vocab_size_divisible_by=divisible_by,
                                transformer_impl=transformer_impl)
    if not vocab_known and fresh.padded_vocab_size != old.padded_vocab_size:
        raise ValueError(
            f"the checkpoint records no true vocab size (only padded_vocab_size={old.padded_vocab_size}); at TP={tp} "
            f"with --make-vocab-size-divisible-by {divisible_by} Megatron-LM pads to a multiple of "
            f"{divisible_by * tp}, which depends on it. Pass --vocab-size N (the tokenizer's size)")
    changed = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "num_layers_per_virtual_pipeline_stage", "padded_vocab_size", "make_vocab_size_divisible_by",
               "world_size", "transformer_impl", "params_dtype", "bf16", "fp16")
    args = argparse.Namespace(**{**vars(old), **{k: getattr(fresh, k) for k in changed}})
    if vocab_known:
        args.vocab_size = cfg.vocab_size
        if getattr(args, "tokenizer_type", None) in _TOKENIZERS_WITH_EOD_AFTER_VOCAB:
            args.vocab_size = cfg.vocab_size - 1
    return args


def rms_norm_eps_from_args(a: argparse.Namespace) -> float:
    """The norm epsilon megatron-core computes with, under whichever name the args record it."""
    v = read_arg(a, FIELDS["rms_norm_eps"])
    return float(v if v is not None else FIELDS["rms_norm_eps"].megatron_default)


def detect_name_style(state_dict: dict) -> str:
    """'te' (Transformer Engine's fused layer-norm names) or 'local', from a model state dict's keys."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in state_dict) else "local"


def arch_from_args(a: argparse.Namespace) -> Arch:
    from megatron_bridge.layout import Arch

    a = legacy_arg_names(a)
    return Arch(qkv_bias=bool(getattr(a, "add_qkv_bias", False) or getattr(a, "add_bias_linear", False)),
                linear_bias=bool(getattr(a, "add_bias_linear", False)),
                qk_layernorm=bool(getattr(a, "qk_layernorm", False)),
                untie=bool(getattr(a, "untie_embeddings_and_output_weights", False)))


def shape_from_args(a: argparse.Namespace, vocab_size: int) -> Shape:
    from megatron_bridge.param_kinds import Shape

    ng = a.num_query_groups if getattr(a, "group_query_attention", False) else a.num_attention_heads
    hd = getattr(a, "kv_channels", None) or a.hidden_size // a.num_attention_heads
    return Shape(num_heads=a.num_attention_heads, num_groups=ng, head_dim=hd, vocab_size=vocab_size,
                 padded_vocab_size=a.padded_vocab_size)


def parallel_sizes(a: argparse.Namespace) -> tuple[int, int, int]:
    vpp = getattr(a, "virtual_pipeline_model_parallel_size", None) or 1
    return a.tensor_model_parallel_size, a.pipeline_model_parallel_size, vpp
