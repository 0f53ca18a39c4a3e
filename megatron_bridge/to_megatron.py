"""Canonical tensors -> Megatron legacy checkpoint ranks, streamed: one tensor in memory at a time, not one rank.

For every (pipeline rank, tensor rank), `rank_tensors` builds the rank's tensors one after another from the
canonical source by the layout table and the split kinds, and `legacy_format.save_ranks_streamed` writes each as its
own record of the rank file while the next is built (`rank_file_writer`), up to RANK_FILES_AT_ONCE rank files
together. Each piece travels as blocks that are slices of the source, written straight from its memory map: row
blocks (`Kind.shard_parts`, over the source's own blocks from `get_parts`), or column blocks for a row-parallel
piece (`Columns`, over `get_column_parts`), written row by row. So nothing is concatenated (fused QKV, gate+up) or
cloned (a slice), and resharding a Megatron checkpoint never merges a weight's TP shards first; only vocabulary
padding and the source's own dtype conversion build new tensors. Peak memory is the pieces in flight, not a rank's
shard.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from checkpoint_tools.canonical import TensorSource, expected_shapes
from checkpoint_tools.atomic_dir import atomic_directory
from megatron_bridge import legacy_format, sidecar
from megatron_bridge.layout import (LAYER_PARAMS, NAME_STYLES, TE_EXTRA_STATE, Arch, canonical_layer_names,
                                    global_params, layer_prefix, stage_layers)
from megatron_bridge.megatron_args import arch_from_args, parallel_sizes, shape_from_args
from megatron_bridge.param_kinds import ROW, Kind, Shape, check_tp
from megatron_bridge.rank_file_writer import Columns

# Rank files written together, each by its own thread (a big node's cores; the page-cache copy is the cost).
RANK_FILES_AT_ONCE = max(1, min(8, os.cpu_count() or 1))


def _rows(blocks: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """Rows [lo, hi) of the concatenation of `blocks` along dim 0, as views of the blocks."""
    out, start = [], 0
    for b in blocks:
        a, z = max(lo, start), min(hi, start + b.shape[0])
        if a < z:
            out.append(b[a - start:z - start])
        start += b.shape[0]
    return out


def _shard(kind: Kind, inputs: list[list[torch.Tensor]], tp: int, tp_rank: int, shape: Shape) -> list[torch.Tensor]:
    """Rank `tp_rank`'s piece as row blocks whose concatenation it is (`Kind.shard_parts`), each input given as row
    blocks too (`TensorSource.get_parts`: a Megatron source's TP shards). Blocks are views of the source where the
    kind allows: a fused QKV or gate+up shard is never concatenated in memory, and resharding a Megatron checkpoint
    never merges a column-parallel tensor first; the rank file writer writes each block's own bytes.

    For inputs in several blocks the kind is asked which rows of which input each output block holds, by splitting
    tensors of row numbers ([rows, 1]), so the split rules stay the kind's own; a kind that builds new rows
    (vocabulary padding) gets the inputs concatenated instead."""
    if all(len(blocks) == 1 for blocks in inputs):
        return kind.shard_parts([blocks[0] for blocks in inputs], tp, tp_rank, shape)
    numbers = [torch.arange(sum(b.shape[0] for b in blocks)).unsqueeze(1) for blocks in inputs]
    owner = {t.untyped_storage().data_ptr(): j for j, t in enumerate(numbers)}
    out = []
    for part in kind.shard_parts(numbers, tp, tp_rank, shape):
        j = owner.get(part.untyped_storage().data_ptr())
        if j is None or tuple(part.shape[1:]) != (1,) or (part.shape[0] > 1 and part.stride(0) != 1):
            return kind.shard_parts([blocks[0] if len(blocks) == 1 else torch.cat(blocks) for blocks in inputs],
                                    tp, tp_rank, shape)
        first = part.storage_offset()
        out += _rows(inputs[j], first, first + part.shape[0])
    return out


def _row_parallel_piece(source: TensorSource, name: str, shapes: dict, kind: Kind, tp: int, tp_rank: int,
                        shape: Shape) -> Optional[Columns]:
    """A row-parallel rank's piece as column blocks (`rank_file_writer.Columns`), written row by row from the
    source: a column slice of the canonical tensor, or of the source's TP shards side by side (`get_column_parts`),
    so resharding never merges a row-parallel weight first. Which columns: the kind's own split of a [1, columns]
    tensor of column numbers. None when the kind's piece is not a column range (the caller then splits `get`)."""
    if name not in shapes:
        return None
    blocks = source.get_column_parts(name) or [source.get(name)]
    if any(b.dim() != 2 for b in blocks):
        return None
    numbers = torch.arange(sum(b.shape[1] for b in blocks)).unsqueeze(0)
    parts = kind.shard_parts([numbers], tp, tp_rank, shape)
    if len(parts) != 1 or parts[0].untyped_storage().data_ptr() != numbers.untyped_storage().data_ptr() or \
            parts[0].shape[0] != 1 or (parts[0].shape[1] > 1 and parts[0].stride(1) != 1):
        return None
    lo = parts[0].storage_offset()
    hi, out, start = lo + parts[0].shape[1], Columns(), 0
    for b in blocks:
        a, z = max(lo, start), min(hi, start + b.shape[1])
        if a < z:
            out.append(b[:, a - start:z - start])
        start += b.shape[1]
    return out


def _canonical(source: TensorSource, name: str, shapes: dict) -> torch.Tensor:
    """The canonical tensor, or zeros for a bias Megatron's args imply but the model does not have."""
    if name in shapes:
        return source.get(name)
    if name.endswith(".bias"):
        # Its shape is the one it would have if the model had every bias.
        every_bias = dataclasses.replace(source.config, qkv_bias=True, o_bias=True, mlp_bias=True)
        return torch.zeros(expected_shapes(every_bias)[name], dtype=source.dtype_of(source.names()[0]))
    raise ValueError(f"Megatron needs {name}, which this model does not have")


def _canonical_blocks(source: TensorSource, name: str, shapes: dict, kind: Kind) -> list[torch.Tensor]:
    """`_canonical` as the source's row blocks (a Megatron source's TP shards, nothing merged); whole for a
    row-parallel kind, which splits within rows."""
    if name in shapes and kind is not ROW:
        return source.get_parts(name)
    return [_canonical(source, name, shapes)]


def rank_tensors(source: TensorSource, args: argparse.Namespace, style: str, tp_rank: int,
                 pp_rank: int) -> Iterator[tuple[int, str, Optional[list[torch.Tensor]]]]:
    """(virtual chunk, name, blocks) of model rank (tp_rank, pp_rank) in state-dict order, each built only when
    asked for: the tensor is the blocks' concatenation along dim 0, or along dim 1 for `Columns` (a row-parallel
    piece); `RankFileWriter.add` takes them as they are. None for Transformer Engine's `_extra_state` entries."""
    cfg = source.config
    arch: Arch = arch_from_args(args)
    shape = shape_from_args(args, cfg.vocab_size)
    tp, pp, vpp = parallel_sizes(args)
    shapes = expected_shapes(cfg)
    layers = stage_layers(cfg.num_layers, pp, vpp)
    for v in range(vpp):
        for param, canon in global_params(arch, pp_rank, v, pp, vpp):
            yield v, param.name(style), _shard(param.kind, [_canonical_blocks(source, canon, shapes, param.kind)], tp,
                                               tp_rank, shape)
        for local, layer in enumerate(layers[(pp_rank, v)]):
            prefix = layer_prefix(local)
            for param in LAYER_PARAMS:
                if not param.present(arch):
                    continue
                names = canonical_layer_names(param.roles, layer)
                piece = None
                if param.kind is ROW and len(names) == 1:
                    piece = _row_parallel_piece(source, names[0], shapes, param.kind, tp, tp_rank, shape)
                if piece is None:
                    piece = _shard(param.kind, [_canonical_blocks(source, n, shapes, param.kind) for n in names], tp,
                                   tp_rank, shape)
                yield v, prefix + param.name(style), piece
            if style == "te":
                for extra in TE_EXTRA_STATE:
                    yield v, prefix + extra, None


def rank_models(source: TensorSource, args: argparse.Namespace, style: str, tp_rank: int,
                pp_rank: int) -> list[dict]:
    """The state dicts (one per virtual chunk) of model rank (tp_rank, pp_rank), whole in memory (for callers that
    need them as dicts; writing streams `rank_tensors` instead)."""
    models: list[dict] = [{} for _ in range(parallel_sizes(args)[2])]
    for v, name, blocks in rank_tensors(source, args, style, tp_rank, pp_rank):
        dim = 1 if isinstance(blocks, Columns) else 0
        models[v][name] = None if blocks is None else blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=dim)
    return models


def count_rank_tensors(args: argparse.Namespace, num_layers: int) -> int:
    """How many tensors `rank_models` writes over all ranks (the progress bar's total; TE extra state excluded)."""
    arch = arch_from_args(args)
    tp, pp, vpp = parallel_sizes(args)
    per_layer = sum(1 for param in LAYER_PARAMS if param.present(arch))
    return tp * sum(len(list(global_params(arch, p, v, pp, vpp))) + len(layers) * per_layer
                    for (p, v), layers in stage_layers(num_layers, pp, vpp).items())


def check_canonical_fits(source: TensorSource, arch: Arch) -> None:
    """Refuse what a Megatron GPT model built from `args` cannot hold (never approximate)."""
    cfg = source.config
    if cfg.mlp_bias and not arch.linear_bias:
        raise ValueError("mlp biases need add_bias_linear")
    shapes = expected_shapes(cfg)
    homeless = [n for n in source.names() if n not in shapes]
    if homeless:
        raise ValueError(f"tensors with no place in a Megatron GPT model: {homeless[:10]}")


def write_legacy(source: TensorSource, dst: str, args: argparse.Namespace, *, style: str = "local",
                 iteration: Optional[int] = None, family: Optional[str] = None, hf_config: Optional[dict] = None,
                 assets_from: Optional[str] = None, copy_sidecar_from: Optional[str] = None, force: bool = False,
                 progress: bool = True, record_config: bool = True) -> str:
    """Write `source` as a legacy Megatron checkpoint at `dst` with the parallel layout in `args`.

    `record_config=False` writes no `workbench.json` of our own: for a source whose config is partly unknown (a
    Megatron-LM checkpoint with no true vocab), a record would state a guess as a fact.
    """
    if style not in NAME_STYLES:
        raise ValueError(f"name style {style!r}; use one of {NAME_STYLES}")
    cfg = source.config
    tp, pp, vpp = parallel_sizes(args)
    check_tp(tp, shape_from_args(args, cfg.vocab_size), cfg.intermediate_size)
    stage_layers(cfg.num_layers, pp, vpp)  # validates PP/VPP before anything is written
    check_canonical_fits(source, arch_from_args(args))
    with atomic_directory(dst, force=force) as tmp:
        # Counted in tensors, not ranks, so the bar moves at TP=1 PP=1 too.
        bar = tqdm(total=count_rank_tensors(args, cfg.num_layers), unit="tensor", disable=not progress,
                   desc=f"writing {os.path.basename(os.path.abspath(dst))}")
        ranks = [(t, p) for p in range(pp) for t in range(tp)]  # a stage's TP ranks together: each source
        for first in range(0, len(ranks), RANK_FILES_AT_ONCE):  # tensor is read once for all of them
            wave = ranks[first:first + RANK_FILES_AT_ONCE]
            legacy_format.save_ranks_streamed(tmp, iteration, args,
                                              {(t, p): rank_tensors(source, args, style, t, p) for t, p in wave},
                                              on_tensor=bar.update)
            source.release()  # after the rank files are closed: no write still reads the source's maps
        bar.close()
        legacy_format.write_tracker(tmp, iteration)
        if copy_sidecar_from:
            # Keep the source's record (family, HF config, tokenizer files); only the name style may change.
            sidecar.copy_sidecar(copy_sidecar_from, tmp)
            data = sidecar.read_sidecar(tmp)
            if data is not None:
                sidecar.write_sidecar(tmp, cfg, family=data.get("family"), hf_config=data.get("source_hf_config"),
                                      name_style=style)
        elif record_config:
            sidecar.write_sidecar(tmp, cfg, family=family, hf_config=hf_config, name_style=style,
                                  assets_from=assets_from)
    return dst
