"""Conversion entry points: detect what a folder holds, plan the steps, run them.

The plan (`megatron_bridge.conversion_plan`) decides which primitive conversions run and with which options; this
module holds the primitives and runs a plan, staging intermediate folders in a scratch folder beside the
destination. Aliases in the familiar shape (`trans_qwen_to_llama`, `trans_llama_to_qwen`, `trans_gemma_to_megatron`)
name a source and a target: `parse_alias` turns one into (source, target); the source is checked before converting.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig, CastSource, TensorSource
from checkpoint_tools.families import FAMILIES, family_names, get_family
from checkpoint_tools.hf_checkpoint import HFSource, read_hf_config, write_hf_checkpoint
from checkpoint_tools.atomic_dir import check_destination, scratch_directory
from checkpoint_tools.pickle_trust import trust_policy
from megatron_bridge import legacy_format, sidecar, torch_dist_format
from megatron_bridge.checkpoint_format import detect_format  # noqa: F401 - also convert's API
from megatron_bridge.conversion_plan import DEFAULTS, DESTINATION, SOURCE, ConvertOptions, Plan, plan_conversion
from megatron_bridge.from_megatron import MegatronSource
from megatron_bridge.megatron_args import args_from_canonical, parallel_sizes, resharded_args
from megatron_bridge.rank_file_writer import streaming_quietly
from megatron_bridge.to_megatron import write_legacy
from megatron_bridge.torch_dist_reader import TorchDistSource
from megatron_bridge.torch_dist_writer import write_torch_dist

log = logging.getLogger(__name__)


def _cast(source: TensorSource, dtype: Optional[str]) -> TensorSource:
    return CastSource(source, getattr(torch, dtype)) if dtype else source


def open_megatron(path: str, opts: ConvertOptions) -> tuple[TensorSource, Optional[dict]]:
    """A Megatron checkpoint (legacy or torch_dist) as canonical tensors, and its sidecar record."""
    if torch_dist_format.is_torch_dist_checkpoint(path):
        return open_torch_dist(path, opts)
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


def open_torch_dist(path: str, opts: ConvertOptions) -> tuple[TorchDistSource, Optional[dict]]:
    """A torch_dist checkpoint streamed as canonical tensors (see torch_dist_reader), and its sidecar record."""
    meta = sidecar.read_sidecar(path)
    base = CanonicalConfig.from_dict(meta["canonical_config"]) if meta else None
    source = TorchDistSource(path, base, vocab_size=opts.vocab_size, policy=trust_policy(opts.allow_globals))
    if base is None and opts.vocab_size is None and getattr(source.args, "vocab_size", None) is None:
        log.warning("%s records no true vocab size; exporting all %d padded rows (pass --vocab-size to trim)",
                    path, source.args.padded_vocab_size)
    source.report_skipped()
    return source, meta


def _megatron_origin(source: TensorSource) -> tuple:
    """(args, iteration, TP, PP, VPP) of the Megatron checkpoint behind `source`."""
    inner = source.inner if isinstance(source, CastSource) else source
    if isinstance(inner, TorchDistSource):
        return (inner.args, legacy_format.read_tracker(inner.root)) + parallel_sizes(inner.args)
    ckpt = inner.ckpt
    return ckpt.args, ckpt.iteration, ckpt.tp, ckpt.pp, ckpt.vpp


def hf_to_megatron(src: str, dst: str, opts: ConvertOptions) -> str:
    source = _cast(HFSource(src, policy=opts.allow_globals), opts.dtype)
    args = args_from_canonical(source.config, tp=opts.tp or 1, pp=opts.pp or 1, vpp=opts.value("vpp"),
                               make_vocab_size_divisible_by=opts.value("make_vocab_size_divisible_by"),
                               transformer_impl=opts.value("name_style"))
    hf = source.inner if isinstance(source, CastSource) else source
    return write_legacy(source, dst, args, style=opts.value("name_style"), family=hf.family.model_type,
                        hf_config=hf.hf_config, assets_from=opts.tokenizer or src, force=opts.force,
                        progress=opts.progress)


def megatron_to_hf(src: str, dst: str, opts: ConvertOptions, family: Optional[str] = None) -> str:
    source, meta = open_megatron(src, opts)
    fam = get_family(family or (meta or {}).get("family") or "llama")
    base = (meta or {}).get("source_hf_config") if fam.model_type == (meta or {}).get("family") else None
    assets = opts.tokenizer or sidecar.assets_dir(src)
    return write_hf_checkpoint(_cast(source, opts.dtype), dst, fam, base_config=base, assets_dir=assets,
                               max_shard_bytes=opts.value("max_shard_bytes"), force=opts.force,
                               progress=opts.progress)


def output_layout(opts: ConvertOptions, tp: int, pp: int, vpp: int, divisible_by: Optional[int]) -> tuple:
    """(TP, PP, VPP, divisible-by) of Megatron output from a Megatron source: each flag given wins, the rest are the
    source's (VPP falls back to 1 when the output has a single pipeline stage, where there is nothing to
    interleave)."""
    out_pp = opts.pp or pp
    out_vpp = opts.vpp if opts.vpp is not None else (vpp if out_pp > 1 else 1)
    div = opts.make_vocab_size_divisible_by or divisible_by or DEFAULTS["make_vocab_size_divisible_by"]
    return opts.tp or tp, out_pp, out_vpp, div


def megatron_to_megatron(src: str, dst: str, opts: ConvertOptions, out_format: str = "legacy") -> str:
    """Any Megatron checkpoint (legacy or torch_dist) rewritten as `out_format` at the layout, names and dtype the
    options ask for, streamed through canonical tensors in this process."""
    source, meta = open_megatron(src, opts)
    source = _cast(source, opts.dtype)
    old, iteration, src_tp, src_pp, src_vpp = _megatron_origin(source)
    tp, pp, vpp, div = output_layout(opts, src_tp, src_pp, src_vpp, getattr(old, "make_vocab_size_divisible_by", None))
    # Keep the training hyperparameters of the source run; only the layout and what depends on it change. A source
    # with no known true vocab keeps it unknown: no record of ours claims the padded size as the vocab.
    vocab_known = (source.inner if isinstance(source, CastSource) else source).vocab_known
    style = "local" if out_format == "torch_dist" else opts.value("name_style")
    args = resharded_args(old, source.config, vocab_known=vocab_known, tp=tp, pp=pp, vpp=vpp, divisible_by=div,
                          transformer_impl=style)
    write = write_torch_dist if out_format == "torch_dist" else functools.partial(write_legacy, style=style)
    return write(source, dst, args, iteration=iteration, copy_sidecar_from=src if meta else None, force=opts.force,
                 progress=opts.progress, record_config=vocab_known)


def hf_to_torch_dist(src: str, dst: str, opts: ConvertOptions) -> str:
    """HF -> torch_dist in one process, one tensor at a time (torch_dist_writer); the args record TP x PP (x VPP),
    the layout megatron-core is told to load it at unless the loader asks for another."""
    source = _cast(HFSource(src, policy=opts.allow_globals), opts.dtype)
    args = args_from_canonical(source.config, tp=opts.tp or 1, pp=opts.pp or 1, vpp=opts.value("vpp"),
                               make_vocab_size_divisible_by=opts.value("make_vocab_size_divisible_by"),
                               transformer_impl="local")
    hf = source.inner if isinstance(source, CastSource) else source
    return write_torch_dist(source, dst, args, family=hf.family.model_type, hf_config=hf.hf_config,
                            assets_from=opts.tokenizer or src, force=opts.force, progress=opts.progress)


def hf_to_family(src: str, dst: str, opts: ConvertOptions, family: str) -> str:
    from checkpoint_tools.family_convert import convert_family

    return convert_family(src, dst, family, dtype=opts.dtype, tokenizer=opts.tokenizer,
                          max_shard_bytes=opts.value("max_shard_bytes"), force=opts.force, progress=opts.progress,
                          allow_globals=opts.allow_globals)


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


# Each primitive reads one folder and writes one; `family` is the Hugging Face target family, where one applies.
STEP_FUNCTIONS = {
    "hf_to_legacy": lambda src, dst, opts, family: hf_to_megatron(src, dst, opts),
    "hf_to_family": lambda src, dst, opts, family: hf_to_family(src, dst, opts, family),
    "legacy_to_hf": lambda src, dst, opts, family: megatron_to_hf(src, dst, opts, family=family),
    "legacy_to_legacy": lambda src, dst, opts, family: megatron_to_megatron(src, dst, opts),
    "hf_to_torch_dist": lambda src, dst, opts, family: hf_to_torch_dist(src, dst, opts),
    "torch_dist_to_hf": lambda src, dst, opts, family: megatron_to_hf(src, dst, opts, family=family),
    "legacy_to_torch_dist": lambda src, dst, opts, family: megatron_to_megatron(src, dst, opts, "torch_dist"),
    "torch_dist_to_legacy": lambda src, dst, opts, family: megatron_to_megatron(src, dst, opts, "legacy"),
    "torch_dist_to_torch_dist": lambda src, dst, opts, family: megatron_to_megatron(src, dst, opts, "torch_dist"),
}


def make_plan(src: str, opts: ConvertOptions, to: Optional[str] = None, source: Optional[str] = None) -> Plan:
    """Detect the source format (checked against `source` when given) and plan the conversion; reads no tensors."""
    fmt = detect_format(src)
    if opts.tokenizer is not None and not os.path.isdir(opts.tokenizer):
        raise ValueError(f"--tokenizer {opts.tokenizer}: not a folder (pass the folder that holds tokenizer.json "
                         f"or tokenizer.model and their config files)")
    if source is not None:
        check_source(src, fmt, source)
    target = None if to in (None, "megatron") else get_family(to).model_type  # unknown names list the supported
    return plan_conversion(fmt, opts, target_family=target, megatron_target=to == "megatron")


def run_plan(plan: Plan, src: str, dst: str, opts: ConvertOptions) -> str:
    """Run the steps in order; intermediate folders live in one scratch folder beside `dst`, removed at the end."""
    check_destination(dst, opts.force, sources=(src, opts.tokenizer))
    with streaming_quietly():  # every direction streams memory-bound copies: one torch thread, no cyclic GC
        return _run_steps(plan, src, dst, opts)


def _run_steps(plan: Plan, src: str, dst: str, opts: ConvertOptions) -> str:
    if len(plan.steps) == 1:
        (step,) = plan.steps
        return STEP_FUNCTIONS[step.action](src, dst, step.options(opts), plan.target_family)
    with scratch_directory(dst) as tmp:
        where = {SOURCE: src, DESTINATION: dst}
        for step in plan.steps:
            for name in (step.src, step.dst):
                where.setdefault(name, os.path.join(tmp, name))
            STEP_FUNCTIONS[step.action](where[step.src], where[step.dst], step.options(opts), plan.target_family)
    return dst


def convert(src: str, dst: str, opts: ConvertOptions, to: Optional[str] = None,
            source: Optional[str] = None) -> tuple[str, str]:
    """Plan and run a conversion. Returns (what was done, dst)."""
    plan = make_plan(src, opts, to=to, source=source)
    return plan.summary, run_plan(plan, src, dst, opts)


__all__ = ["ConvertOptions", "convert", "make_plan", "run_plan", "hf_to_megatron", "megatron_to_hf",
           "megatron_to_megatron", "hf_to_family", "parse_alias", "common_aliases", "family_names"]
