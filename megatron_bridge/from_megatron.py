"""Megatron checkpoint ranks -> canonical tensors, merged lazily one parameter at a time.

`MegatronSource` indexes every parameter of every rank against the layout table up front, so an unknown name fails
before anything is written, and merges a parameter's TP shards only when a canonical tensor of it is asked for.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig, TensorSource, expected_tensor_names
from checkpoint_tools.canonical import EMBED
from checkpoint_tools.errors import CheckpointError
from megatron_bridge.param_kinds import ROW
from megatron_bridge.layout import (EMBEDDING, LAYER_PARAMS, OUTPUT_LAYER, TE_EXTRA_STATE, Param,
                                    canonical_layer_names, global_params, layer_prefix, stage_layers)
from megatron_bridge.legacy_format import LegacyCheckpoint
from megatron_bridge.megatron_args import (arch_from_args, detect_name_style,  # noqa: F401
                                          shape_from_args, source_config)

log = logging.getLogger(__name__)


class MegatronSource(TensorSource):
    """Canonical view of an opened Megatron checkpoint (any TP/PP/VPP, local or TE names)."""

    def __init__(self, ckpt: LegacyCheckpoint, base_config: Optional[CanonicalConfig] = None,
                 vocab_size: Optional[int] = None):
        self.ckpt = ckpt
        args = ckpt.args
        self.config, self.vocab_known = source_config(args, ckpt.root, base_config, vocab_size)
        self.arch = arch_from_args(args)
        self.shape = shape_from_args(args, self.config.vocab_size)
        pp, vpp = ckpt.pp, ckpt.vpp
        self.style = detect_name_style(ckpt.models(0, 0)[0])
        # canonical name -> (param, pp_rank, chunk, key, index into the param's roles)
        self._index: dict[str, tuple[Param, int, int, str, int]] = {}
        used: dict[tuple[int, int], set] = {(p, v): set() for p in range(pp) for v in range(vpp)}
        for (p, v), layers in stage_layers(self.config.num_layers, pp, vpp).items():
            for param, canon in global_params(self.arch, p, v, pp, vpp):
                key = param.name(self.style)
                used[(p, v)].add(key)
                if not (param is OUTPUT_LAYER and canon == EMBED):  # tied copy on the last stage: not a tensor
                    self._index[canon] = (param, p, v, key, 0)
            for local, layer in enumerate(layers):
                prefix = layer_prefix(local)
                for param in LAYER_PARAMS:
                    if not param.present(self.arch):
                        continue
                    key = prefix + param.name(self.style)
                    used[(p, v)].add(key)
                    for j, cname in enumerate(canonical_layer_names(param.roles, layer)):
                        self._index[cname] = (param, p, v, key, j)
                if self.style == "te":
                    used[(p, v)].update(prefix + e for e in TE_EXTRA_STATE)
        self._check_names(used)
        self._check_tied_copy()
        self._cache: tuple = (None, None)
        wanted = set(expected_tensor_names(self.config))
        missing = sorted(wanted - set(self._index))
        if missing:
            raise CheckpointError(f"{ckpt.root}: the checkpoint lacks tensors its config implies: {missing[:10]}")
        self._check_absent_are_zero(set(self._index) - wanted)

    def _check_names(self, used: dict) -> None:
        problems = []
        for (t, p) in self.ckpt.ranks:
            for v, sd in enumerate(self.ckpt.models(t, p)):
                keys = set(sd)
                unknown = sorted(k for k in keys - used[(p, v)] if not k.endswith("._extra_state"))
                missing = sorted(used[(p, v)] - keys - {k for k in used[(p, v)] if k.endswith("._extra_state")})
                if unknown:
                    problems.append(f"rank tp={t} pp={p} chunk={v}: unknown parameters {unknown[:10]}")
                if missing:
                    problems.append(f"rank tp={t} pp={p} chunk={v}: missing parameters {missing[:10]}")
        if problems:
            raise CheckpointError(f"{self.ckpt.root}: parameter names do not match the layout its args imply "
                                  f"(nothing is dropped silently): " + "; ".join(problems[:8]))

    def _check_tied_copy(self) -> None:
        """With tied embeddings and PP > 1 the last stage stores its own copy of the embedding as
        `output_layer.weight`, and Megatron-LM keeps the two equal by all-reducing their gradients. A copy that
        differs means Megatron's logits came from another matrix than its input embedding: one tied tensor cannot
        hold both, so exporting either would silently change the model."""
        pp, vpp = self.ckpt.pp, self.ckpt.vpp
        if self.arch.untie or (pp, vpp) == (1, 1):
            return
        emb_key, out_key = EMBEDDING.name(self.style), OUTPUT_LAYER.name(self.style)
        for t in range(self.ckpt.tp):
            emb = self.ckpt.models(t, 0)[0][emb_key]
            out = self.ckpt.models(t, pp - 1)[vpp - 1][out_key]
            if emb.shape != out.shape or not torch.equal(emb, out):
                diff = (emb.float() - out.float()).abs().max().item() if emb.shape == out.shape else "shape"
                raise CheckpointError(
                    f"{self.ckpt.root}: tied embeddings (untie_embeddings_and_output_weights=False), but TP rank {t}'s "
                    f"output_layer.weight on the last pipeline stage differs from embedding.word_embeddings.weight "
                    f"on the first (max |diff| {diff}); the stages have diverged and one tied tensor cannot hold "
                    f"both. Nothing was written; convert a checkpoint whose stages agree")

    def _check_absent_are_zero(self, extra: set) -> None:
        """Biases Megatron's args forced on a model without them must still be zero, or the target loses them."""
        for name in sorted(extra):
            t = self.get(name)
            if torch.count_nonzero(t):
                raise ValueError(f"{name} is nonzero in the checkpoint, but the target config has no such tensor "
                                 f"(e.g. o_bias/mlp_bias=False); it cannot be expressed, so nothing was written")

    def names(self) -> list[str]:
        return expected_tensor_names(self.config)

    def dtype_of(self, name: str) -> torch.dtype:
        param, p, v, key, _ = self._index[name]
        return self.ckpt.models(0, p)[v][key].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._merged(name, "merge")

    def get_parts(self, name: str) -> list[torch.Tensor]:
        """The TP shards' row blocks that make up `name`, nothing copied (see Kind.merge_parts)."""
        return self._merged(name, "merge_parts")

    def get_column_parts(self, name: str) -> Optional[list[torch.Tensor]]:
        """A row-parallel weight's TP shards as they are (their concatenation along dim 1 is the tensor)."""
        param = self._index[name][0]
        return self._merged(name, "column_parts") if param.kind is ROW else None

    def _merged(self, name: str, how: str):
        """One parameter's shards merged (`merge`) or cut into blocks (`merge_parts`); the last one is kept, as
        a fused parameter (QKV, gate/up) serves several canonical tensors in a row."""
        param, p, v, key, j = self._index[name]
        if self._cache[0] != (p, v, key, how):
            shards = [self.ckpt.models(t, p)[v][key] for t in range(self.ckpt.tp)]
            self._cache = ((p, v, key, how), [shards] if how == "column_parts" else
                           getattr(param.kind, how)(shards, self.shape))
        return self._cache[1][j]
