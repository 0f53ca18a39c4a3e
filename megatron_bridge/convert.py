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
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig, CastSource, TensorSource
from checkpoint_tools.families import FAMILIES, family_names, get_family
from checkpoint_tools.hf_checkpoint import HFSource, is_hf_checkpoint, read_hf_config, write_hf_checkpoint
from checkpoint_tools.safetensors_io import CheckpointError
from checkpoint_tools.atomic_dir import atomic_directory, check_destination
from megatron_bridge import legacy_format, sidecar, torch_dist_format
from megatron_bridge.from_megatron import MegatronSource
from megatron_bridge.layout import stage_layers
from megatron_bridge.megatron_args import args_from_canonical, parallel_sizes, shape_from_args
from megatron_bridge.param_kinds import check_tp
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
        found.append("megatron_torch_dist" if torch_dist_format.is_torch_dist_checkpoint(path) else "megatron_legacy")
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
    # Megatron output format: "legacy" (mp_rank_* torch pickles) or "torch_dist"; None = legacy from HF, else the
    # source's own format.
    format: Optional[str] = None
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
    ckpt = source.inner.ckpt if isinstance(source, CastSource) else source.ckpt
    old = ckpt.args
    fresh = args_from_canonical(source.config, tp=opts.tp or ckpt.tp, pp=opts.pp or ckpt.pp,
                                vpp=opts.vpp if (opts.tp or opts.pp or opts.vpp != 1) else ckpt.vpp,
                                make_vocab_size_divisible_by=getattr(old, "make_vocab_size_divisible_by", 128),
                                transformer_impl=opts.name_style)
    # Keep the training hyperparameters of the source run; only the layout and what depends on it change.
    args = type(old)(**{**vars(old), **{k: getattr(fresh, k) for k in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
        "num_layers_per_virtual_pipeline_stage", "padded_vocab_size", "world_size", "transformer_impl",
        "params_dtype", "bf16", "fp16")}})
    it = ckpt.iteration
    return write_legacy(source, dst, args, style=opts.name_style, iteration=it,
                        copy_sidecar_from=src if meta else None, force=opts.force,
                        progress=opts.progress)


def legacy_to_torch_dist(src: str, dst: str, opts: ConvertOptions) -> str:
    """Save a legacy checkpoint as torch_dist at the same layout, through megatron-core's own dist_checkpointing
    (torchrun with one process per model rank, each holding its rank's shard)."""
    from megatron_bridge.mcore_launcher import run_mcore_jobs

    ckpt = legacy_format.open_legacy(src, extra_globals=opts.allow_globals)
    if ckpt.has_optimizer_state:
        log.warning("%s holds optimizer state; torch_dist output keeps model weights only", src)
    with atomic_directory(dst, force=opts.force) as tmp:
        out_dir = os.path.join(tmp, legacy_format.iteration_dir_name(ckpt.iteration))
        run_mcore_jobs([{"checkpoint": os.path.abspath(src), "task": "to_torch_dist", "out_dir": out_dir,
                         "iteration": ckpt.iteration}], nproc=ckpt.tp * ckpt.pp)
        legacy_format.write_tracker(tmp, ckpt.iteration)
        sidecar.copy_sidecar(src, tmp)
    return dst


def torch_dist_to_legacy(src: str, dst: str, opts: ConvertOptions) -> str:
    """Load a torch_dist checkpoint into megatron-core at the requested layout (default: the saved one; megatron-core
    reshards at load) and write it as a legacy checkpoint with local names."""
    from megatron_bridge.mcore_launcher import run_mcore_jobs

    args = torch_dist_format.validate(src)["args"]
    tp0, pp0, vpp0 = parallel_sizes(args)
    tp, pp = opts.tp or tp0, opts.pp or pp0
    vpp = opts.vpp if (opts.tp or opts.pp or opts.vpp != 1) else vpp0
    check_tp(tp, shape_from_args(args, args.padded_vocab_size), args.ffn_hidden_size)
    stage_layers(args.num_layers, pp, vpp)
    iteration = legacy_format.read_tracker(src)
    with atomic_directory(dst, force=opts.force) as tmp:
        run_mcore_jobs([{"checkpoint": os.path.abspath(src), "task": "to_legacy", "tp": tp, "pp": pp, "vpp": vpp,
                         "out_root": tmp, "iteration": iteration}], nproc=tp * pp)
        legacy_format.write_tracker(tmp, iteration)
        sidecar.copy_sidecar(src, tmp)
    return dst


def _scratch(dst: str) -> tempfile.TemporaryDirectory:
    """A scratch folder beside `dst` (same file system, so the space is where the user said it would be)."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{os.path.basename(dst)}.scratch-", dir=parent)


def _staged(opts: ConvertOptions, **changes) -> ConvertOptions:
    from dataclasses import replace
    return replace(opts, **{"force": False, **changes})


def to_megatron_format(src: str, dst: str, opts: ConvertOptions, src_fmt: str) -> str:
    """Megatron -> Megatron in any combination of legacy / torch_dist, resharding when TP/PP/VPP are given."""
    out_fmt = opts.format or ("torch_dist" if src_fmt == "megatron_torch_dist" else "legacy")
    check_destination(dst, opts.force)
    if src_fmt == "megatron_legacy" and out_fmt == "legacy":
        return megatron_to_megatron(src, dst, opts)
    if src_fmt == "megatron_legacy":  # -> torch_dist: reshard in legacy form first if the layout changes
        if opts.tp is None and opts.pp is None and opts.vpp == 1 and opts.dtype is None:
            return legacy_to_torch_dist(src, dst, opts)
        with _scratch(dst) as tmp:
            staged = os.path.join(tmp, "legacy")
            megatron_to_megatron(src, staged, _staged(opts, name_style="local"))
            return legacy_to_torch_dist(staged, dst, opts)
    # torch_dist source: megatron-core reshards at load
    if out_fmt == "legacy" and opts.name_style == "local" and opts.dtype is None:
        return torch_dist_to_legacy(src, dst, opts)
    with _scratch(dst) as tmp:
        staged = os.path.join(tmp, "legacy")
        torch_dist_to_legacy(src, staged, _staged(opts))
        if out_fmt == "legacy":
            return megatron_to_megatron(staged, dst, _staged(opts, tp=None, pp=None, vpp=1, force=opts.force))
        if opts.dtype is not None:
            recast = os.path.join(tmp, "recast")
            megatron_to_megatron(staged, recast, _staged(opts, tp=None, pp=None, vpp=1, name_style="local"))
            staged = recast
        return legacy_to_torch_dist(staged, dst, opts)


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
            if opts.format == "torch_dist":
                check_destination(dst, opts.force)
                with _scratch(dst) as tmp:
                    staged = os.path.join(tmp, "legacy")
                    hf_to_megatron(src, staged, _staged(opts, name_style="local"))
                    return "hf -> megatron torch_dist", legacy_to_torch_dist(staged, dst, opts)
            return "hf -> megatron", hf_to_megatron(src, dst, opts)
        if opts.tp is not None or opts.pp is not None or opts.vpp != 1:
            raise ValueError(f"--tp/--pp/--vpp describe Megatron output; --to {to} writes a Hugging Face checkpoint")
        src_family = get_family(read_hf_config(src).get("model_type", "?")).model_type
        return f"{src_family} -> {target}", hf_to_family(src, dst, opts, target)
    kind = "torch_dist" if fmt == "megatron_torch_dist" else "legacy"
    if opts.tp is None and opts.pp is None and opts.format is None and to != "megatron":
        if fmt == "megatron_legacy":
            return f"megatron -> {target or 'hf'}", megatron_to_hf(src, dst, opts, family=target)
        check_destination(dst, opts.force)
        with _scratch(dst) as tmp:
            staged = os.path.join(tmp, "legacy")
            torch_dist_to_legacy(src, staged, _staged(opts))
            return f"megatron torch_dist -> {target or 'hf'}", megatron_to_hf(staged, dst, opts, family=target)
    if target is not None:
        raise ValueError(f"--tp/--pp reshard a Megatron checkpoint; --to {to} writes a Hugging Face one (drop one)")
    out = opts.format or kind
    return f"megatron {kind} -> megatron {out}", to_megatron_format(src, dst, opts, fmt)


__all__ = ["ConvertOptions", "convert", "hf_to_megatron", "megatron_to_hf", "megatron_to_megatron", "hf_to_family",
           "parse_alias", "common_aliases", "family_names"]
