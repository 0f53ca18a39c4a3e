"""Conversion entry points: detect what a folder holds and take the shortest path through the canonical form.

    HF folder        -> Megatron legacy at TP x PP (x VPP), or an HF folder of another family (`to=<family>`)
    Megatron legacy  -> HF folder of any family (no TP/PP given) or Megatron legacy at a new TP x PP (resharding)

Aliases in the familiar shape (`trans_qwen_to_llama`, `trans_llama_to_qwen`, `trans_gemma_to_megatron`, ...) name
a source and a target: `parse_alias` turns one into (source, target); the source is checked before converting.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig, CastSource, TensorSource
from checkpoint_tools.families import FAMILIES, family_names, get_family
from checkpoint_tools.hf_checkpoint import HFSource, is_hf_checkpoint, read_hf_config, write_hf_checkpoint
from checkpoint_tools.safetensors_io import CheckpointError
from megatron_bridge import legacy_format, sidecar
from megatron_bridge.from_megatron import MegatronSource
from megatron_bridge.megatron_args import args_from_canonical, padded_vocab_size
from megatron_bridge.to_megatron import write_legacy

log = logging.getLogger(__name__)


def detect_format(path: str) -> str:
    """'hf', 'megatron_legacy' or 'megatron_torch_dist'; raises for anything else or for a mix."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    found = []
    if is_hf_checkpoint(path):
        found.append("hf")
    if legacy_format.is_legacy_checkpoint(path):
        found.append("megatron_legacy")
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds more than one checkpoint format ({found}); separate them")
    if not found:
        raise CheckpointError(f"{path}: neither a Hugging Face checkpoint (config.json + safetensors) nor a "
                              f"Megatron checkpoint ({legacy_format.TRACKER})")
    return found[0]


@dataclass
class ConvertOptions:
    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: int = 1
    name_style: str = "local"
    make_vocab_size_divisible_by: int = 128
    dtype: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    max_shard_bytes: int = 2 * 1024**3
    force: bool = False
    progress: bool = True
    allow_globals: Iterable[str] = field(default_factory=tuple)


def _cast(source: TensorSource, dtype: Optional[str]) -> TensorSource:
    return CastSource(source, getattr(torch, dtype)) if dtype else source


def open_megatron(path: str, opts: ConvertOptions) -> tuple[MegatronSource, Optional[dict]]:
    ckpt = legacy_format.open_legacy(path, extra_globals=opts.allow_globals)
    meta = sidecar.read_sidecar(path)
    base = CanonicalConfig.from_dict(meta["canonical_config"]) if meta else None
    vocab = opts.vocab_size
    if base is None and vocab is None and getattr(ckpt.args, "vocab_size", None) is None:
        log.warning("%s records no true vocab size; exporting all %d padded rows (pass --vocab-size to trim)",
                    path, ckpt.args.padded_vocab_size)
    if ckpt.has_optimizer_state:
        log.warning("%s holds optimizer state; conversion keeps model weights only and drops it", path)
    return MegatronSource(ckpt, base, vocab_size=vocab), meta


def hf_to_megatron(src: str, dst: str, opts: ConvertOptions) -> str:
    source = _cast(HFSource(src), opts.dtype)
    args = args_from_canonical(source.config, tp=opts.tp or 1, pp=opts.pp or 1, vpp=opts.vpp,
                               make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by,
                               transformer_impl=opts.name_style)
    hf = source.inner if isinstance(source, CastSource) else source
    return write_legacy(source, dst, args, style=opts.name_style, family=hf.family.model_type,
                        hf_config=hf.hf_config, assets_from=opts.tokenizer or src, force=opts.force,
                        progress=opts.progress)


def megatron_to_hf(src: str, dst: str, opts: ConvertOptions, family: Optional[str] = None) -> str:
    source, meta = open_megatron(src, opts)
    fam = get_family(family or (meta or {}).get("family") or "llama")
    base = (meta or {}).get("source_hf_config") if fam.model_type == (meta or {}).get("family") else None
    assets = opts.tokenizer or sidecar.assets_dir(src)
    return write_hf_checkpoint(_cast(source, opts.dtype), dst, fam, base_config=base, assets_dir=assets,
                               max_shard_bytes=opts.max_shard_bytes, force=opts.force, progress=opts.progress)


def megatron_to_megatron(src: str, dst: str, opts: ConvertOptions) -> str:
    source, meta = open_megatron(src, opts)
    source = _cast(source, opts.dtype)
    old = source.inner.ckpt.args if isinstance(source, CastSource) else source.ckpt.args
    fresh = args_from_canonical(source.config, tp=opts.tp or 1, pp=opts.pp or 1, vpp=opts.vpp,
                                make_vocab_size_divisible_by=getattr(old, "make_vocab_size_divisible_by", 128),
                                transformer_impl=opts.name_style)
    # Keep the training hyperparameters of the source run; only the layout and what depends on it change.
    args = type(old)(**{**vars(old), **{k: getattr(fresh, k) for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
        "num_layers_per_virtual_pipeline_stage", "padded_vocab_size", "world_size", "transformer_impl",
        "params_dtype", "bf16", "fp16")}})
    args.padded_vocab_size = padded_vocab_size(source.config.vocab_size, args.tensor_model_parallel_size,
                                               args.make_vocab_size_divisible_by)
    it = source.inner.ckpt.iteration if isinstance(source, CastSource) else source.ckpt.iteration
    return write_legacy(source, dst, args, style=opts.name_style, iteration=it,
                        copy_sidecar_from=src if meta else None, family="llama", force=opts.force,
                        progress=opts.progress)


def hf_to_family(src: str, dst: str, opts: ConvertOptions, family: str) -> str:
    from checkpoint_tools.family_convert import convert_family

    return convert_family(src, dst, family, dtype=opts.dtype, tokenizer=opts.tokenizer,
                          max_shard_bytes=opts.max_shard_bytes, force=opts.force, progress=opts.progress)


_ALIAS = re.compile(r"^trans_([\w.]+?)_to_([\w.]+)$")


def parse_alias(name: str) -> Optional[tuple[str, str]]:
    """`trans_<source>_to_<target>` -> (source, target), each a family model_type or 'megatron'; None if no alias."""
    m = _ALIAS.match(name)
    if not m:
        return None
    return tuple("megatron" if side.lower() == "megatron" else get_family(side).model_type for side in m.groups())


def common_aliases() -> list[str]:
    """The documented aliases: every family to and from llama and megatron (any `trans_X_to_Y` pair works)."""
    short = {f.model_type: (f.aliases[0] if f.aliases else f.model_type).lower() for f in FAMILIES.values()}
    out = []
    for name in sorted(set(short.values()) - {"llama"}):
        out += [f"trans_{name}_to_llama", f"trans_llama_to_{name}"]
    for name in sorted(short.values()):
        out += [f"trans_{name}_to_megatron", f"trans_megatron_to_{name}"]
    return out


def check_source(src: str, fmt: str, expected: str) -> None:
    """Refuse a source that is not what an alias (or `--from`) promised."""
    if expected == "megatron":
        if fmt == "hf":
            raise ValueError(f"{src} is a Hugging Face checkpoint, not a Megatron one")
        return
    want = get_family(expected).model_type
    if fmt != "hf":
        raise ValueError(f"{src} is a Megatron checkpoint, not a Hugging Face {want} one")
    got = read_hf_config(src).get("model_type")
    if get_family(got).model_type != want:
        raise ValueError(f"{src} is a {got} checkpoint, not {want}; use trans_{got}_to_... or --from {got}")


def convert(src: str, dst: str, opts: ConvertOptions, to: Optional[str] = None,
            source: Optional[str] = None) -> tuple[str, str]:
    """Dispatch on the source format (checked against `source` when given). Returns (what was done, dst)."""
    fmt = detect_format(src)
    if source is not None:
        check_source(src, fmt, source)
    target = None if to in (None, "megatron") else get_family(to).model_type  # unknown names list the supported
    if fmt == "hf":
        if target is None:
            return "hf -> megatron", hf_to_megatron(src, dst, opts)
        if opts.tp is not None or opts.pp is not None or opts.vpp != 1:
            raise ValueError(f"--tp/--pp/--vpp describe Megatron output; --to {to} writes a Hugging Face checkpoint")
        src_family = get_family(read_hf_config(src).get("model_type", "?")).model_type
        return f"{src_family} -> {target}", hf_to_family(src, dst, opts, target)
    if opts.tp is None and opts.pp is None and to != "megatron":
        return f"megatron -> {target or 'hf'}", megatron_to_hf(src, dst, opts, family=target)
    if target is not None:
        raise ValueError(f"--tp/--pp reshard a Megatron checkpoint; --to {to} writes a Hugging Face one (drop one)")
    return "megatron -> megatron", megatron_to_megatron(src, dst, opts)


__all__ = ["ConvertOptions", "convert", "hf_to_megatron", "megatron_to_hf", "megatron_to_megatron", "hf_to_family",
           "parse_alias", "common_aliases", "family_names"]
