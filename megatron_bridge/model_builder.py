"""Build a megatron-core GPTModel from a checkpoint's own `args` and load its rank's weights.

Used by verification and generation: the model is whatever megatron-core makes of the args we wrote, so a wrong
arg shows up as wrong logits rather than being papered over. Local-spec modules run everywhere; a checkpoint with
Transformer Engine names is loaded into them by renaming through the layout table.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from megatron_bridge.from_megatron import detect_name_style
from megatron_bridge.layout import LAYER_PARAMS
from megatron_bridge.megatron_args import activation_from_args, parallel_sizes, rms_norm_eps_from_args


def _activation(args: argparse.Namespace):
    """The gated MLP's activation the args ask for: SiLU (swiglu) or Megatron's tanh GELU (openai_gelu, Gemma)."""
    from megatron.core.transformer.utils import openai_gelu

    return {"silu": F.silu, "gelu_pytorch_tanh": openai_gelu}[activation_from_args(args)]


def transformer_config(args: argparse.Namespace):
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, pp, vpp = parallel_sizes(args)
    dtype = args.params_dtype if isinstance(getattr(args, "params_dtype", None), torch.dtype) else torch.float32
    ng = args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=ng, ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=rms_norm_eps_from_args(args), gated_linear_unit=True,
        activation_func=_activation(args), add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=getattr(args, "qk_layernorm", False), hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def build_models(args: argparse.Namespace, config=None, layer_spec=None) -> list:
    """This process's model chunks (one per virtual pipeline stage); parallel state must be initialized.

    `config` defaults to `transformer_config(args)` and `layer_spec` to the local spec (what conversion and
    verification load weights into); training passes its own (initialisation on, Transformer Engine when installed).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = config or transformer_config(args)
    _, _, vpp = parallel_sizes(args)
    spec = layer_spec or get_gpt_layer_local_spec(qk_layernorm=getattr(args, "qk_layernorm", False),
                                                  normalization="RMSNorm")
    models = []
    for v in range(vpp):
        vp = v if vpp > 1 else None
        models.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type="rope", rotary_base=args.rotary_base,
            rope_scaling=getattr(args, "use_rope_scaling", False),
            rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0), vp_stage=vp))
    return models


def te_to_local(state_dict: dict) -> dict:
    """Rename Transformer Engine parameter names to local-spec names and drop TE's `_extra_state`."""
    renames = {p.te: p.local for p in LAYER_PARAMS if p.te != p.local}
    out = {}
    for key, value in state_dict.items():
        if key.endswith("._extra_state"):
            continue
        for te, local in renames.items():
            if key.endswith("." + te):
                key = key[: -len(te)] + local
                break
        out[key] = value
    return out


def load_weights(models: list, rank_models: list[dict]) -> None:
    """Strictly load one rank's state dicts (as stored in the checkpoint) into its model chunks."""
    for model, sd in zip(models, rank_models):
        if detect_name_style(sd) == "te":
            sd = te_to_local(sd)
        sd = {k: v for k, v in sd.items() if not k.endswith("._extra_state")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit the model megatron-core built from args: missing={missing[:10]} "
                               f"unexpected={unexpected[:10]}")
