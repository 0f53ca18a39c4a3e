"""The global, layout-free keys megatron-core stores a GPT model under in a torch_dist checkpoint.

megatron-core's `sharded_state_dict` names every parameter without its layer number and stacks the layers on a
prepended axis: `decoder.layers.self_attention.linear_qkv.weight` has global shape (num_layers, qkv_rows, hidden)
and layer i (global, after PP/VPP offsets) sits at offset (i, 0, 0). TP shards are chunks of that global tensor,
and the global tensor of one layer is exactly the TP=1 legacy tensor: the fused QKV grouped per KV head,
`linear_fc1` as [all gate rows; all up rows], embedding and output layer at the padded vocab. So the key of a
parameter is its Transformer Engine name under `decoder.layers.` (the local spec maps its norms to those names too:
`input_layernorm` is stored as `self_attention.linear_qkv.layer_norm_weight`); older writers' local names are read
as aliases. With tied embeddings only `embedding.word_embeddings.weight` is stored, whatever the pipeline layout;
the keys carry no `model`/`model0` prefix, so virtual pipeline stages do not change them.

Linear layers also store an `_extra_state` byte object per layer (`None` outside Transformer Engine FP8), keyed
`<module>._extra_state/shard_<layer>_<num_layers>`. Everything else a Megatron-LM run saves (optimizer state, RNG
state, megatron-core 0.17+'s `common_state`) is recognised by name and is not model weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from megatron_bridge.layout import EMBEDDING, FINAL_LAYERNORM, LAYER_PARAMS, OUTPUT_LAYER, Arch, Param

LAYERS_PREFIX = "decoder.layers."

# Modules whose `_extra_state` megatron-core saves once per layer (checked against megatron-core 0.16.1's output
# for the local spec and against upstream Megatron-LM's Transformer Engine checkpoints).
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")

_EXTRA_STATE = re.compile(r"^decoder\.layers\.[\w.]+\._extra_state/shard_\d+_\d+$")
# Keys a Megatron-LM run saves beside the model: (pattern, what it is), reported and skipped on read.
NON_MODEL_KEYS = (
    (re.compile(r"^optimizer\."), "optimizer state"),
    (re.compile(r"^rng_state(/|$)"), "RNG state"),
    # megatron-core >= 0.17 stores the common state as ShardedObject "common_state": DCP key common_state/shard_0_1
    (re.compile(r"^common_state(/shard_\d+_\d+)?$"),
     "common state (read from the checkpoint's common state instead)"),
    (_EXTRA_STATE, "Transformer Engine extra state"),
)


@dataclass(frozen=True)
class DistKey:
    """One model tensor of a torch_dist checkpoint: its key, the layout table's parameter, whether it is stacked
    over layers, and the names other writers have stored it under."""

    key: str
    param: Param
    per_layer: bool
    aliases: tuple[str, ...] = ()


def _layer_key(param: Param) -> DistKey:
    aliases = (LAYERS_PREFIX + param.local,) if param.local != param.te else ()
    return DistKey(LAYERS_PREFIX + param.te, param, True, aliases)


def model_keys(arch: Arch) -> list[DistKey]:
    """The model tensors megatron-core stores for a GPT model with these options, in writing order."""
    out = [DistKey(EMBEDDING.te, EMBEDDING, False)]
    out += [_layer_key(p) for p in LAYER_PARAMS if p.present(arch)]
    out.append(DistKey(FINAL_LAYERNORM.te, FINAL_LAYERNORM, False))
    if arch.untie:
        out.append(DistKey(OUTPUT_LAYER.te, OUTPUT_LAYER, False))
    return out


def extra_state_keys(num_layers: int) -> list[str]:
    """The `_extra_state` byte-object keys megatron-core saves for a model of `num_layers` layers."""
    return [f"{LAYERS_PREFIX}{module}._extra_state/shard_{i}_{num_layers}"
            for module in EXTRA_STATE_MODULES for i in range(num_layers)]


def non_model_kind(key: str) -> Optional[str]:
    """What a key that is not a model tensor holds (optimizer state, ...), or None for a key nobody told us of."""
    for pattern, what in NON_MODEL_KEYS:
        if pattern.search(key):
            return what
    return None


def all_param_keys() -> dict[str, Param]:
    """Every key (and alias) any GPT model option set stores, -> its parameter: to tell a key this model's args do
    not imply from one no GPT model has."""
    every = Arch(qkv_bias=True, linear_bias=True, qk_layernorm=True, untie=True)
    out = {}
    for dk in model_keys(every):
        for k in (dk.key,) + dk.aliases:
            out[k] = dk.param
    return out
