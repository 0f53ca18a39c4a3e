"""`inspect`: what a checkpoint folder holds, for any format, without loading tensor data.

Reports format, iteration, TP/PP/VPP, parameter-name style, architecture (canonical config), parameter count
(canonical: unpadded vocab, tied weights once), stored elements (with vocab padding and TP replication), dtypes,
bytes on disk and whether optimizer state is present (conversion keeps model weights only).

No format imports torch or numpy, so `inspect` starts about as fast as Python does: Megatron checkpoints (legacy
and torch_dist) and Hugging Face `pytorch_model.bin` shards are read through checkpoint_tools.pickle_peek (the same
trust policy, tensors as shape/dtype records), safetensors through their headers; a Hugging Face folder goes
through HFSource as conversion opens it, with the family's config table and its tensor-name and shape checks.
`peek=False` loads the pickles with torch instead; tests prove both give the same report.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Iterable

from checkpoint_tools.canonical import CanonicalConfig, expected_shapes
from checkpoint_tools.pickle_peek import peek_torch_file
from megatron_bridge import legacy_format, sidecar, torch_dist_format
from megatron_bridge.checkpoint_format import detect_format
from megatron_bridge.megatron_args import canonical_from_args, detect_name_style, parallel_sizes
from megatron_bridge.safe_load import safe_torch_load

OPTIMIZER_NOTE = "conversion keeps model weights only; optimizer state is dropped with a warning"


def _bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _count(cfg: CanonicalConfig) -> int:
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def _base(path: str):
    meta = sidecar.read_sidecar(path)
    return (CanonicalConfig.from_dict(meta["canonical_config"]) if meta else None), meta


def _hf_tensors(weights, peek: bool) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype name) of every tensor: from headers and peeked pickles, or from torch's own specs."""
    if peek:
        return [weights.shape_and_dtype(n) for n in weights.names()]
    specs = [weights.spec(n) for n in weights.names()]
    return [(tuple(s.shape), str(s.dtype).replace("torch.", "")) for s in specs]


def inspect(path: str, allow_globals: Iterable[str] = (), *, peek: bool = True) -> dict[str, Any]:
    """What `path` holds; every pickle read is vetted by the trust policy (plus `allow_globals` the user trusts).
    `peek`: read pickles as shape/dtype stand-ins and safetensors as headers (no torch); False loads pickles with
    torch and names dtypes through torch, as conversion does (the same report: tests compare the two)."""
    fmt = detect_format(path)
    out: dict[str, Any] = {"path": path, "format": fmt, "bytes_on_disk": _bytes_on_disk(path)}
    if fmt == "hf":
        from checkpoint_tools.hf_checkpoint import HFSource  # the family tables: only a Hugging Face folder needs them
        from checkpoint_tools.torch_bin_io import storage_format

        src = HFSource(path, policy=allow_globals, peek=peek)
        tensors = _hf_tensors(src.weights, peek)
        out.update(family=src.family.model_type, iteration=None, tp=None, pp=None, vpp=None, name_style="hf",
                   storage=storage_format(src.weights),
                   optimizer_state=False, config=src.config.to_dict(), parameters=_count(src.config),
                   stored_elements=sum(math.prod(shape) for shape, _ in tensors),
                   dtypes=dict(collections.Counter(dtype for _, dtype in tensors)))
        return out
    base, meta = _base(path)
    out["family"] = (meta or {}).get("family")
    if fmt == "megatron_legacy":
        ckpt = legacy_format.open_legacy(path, allow_globals, check_data=False,
                                         loader=peek_torch_file if peek else safe_torch_load)
        cfg = canonical_from_args(ckpt.args, base)
        tensors = [t for (tp_rank, pp_rank) in ckpt.ranks for sd in ckpt.models(tp_rank, pp_rank)
                   for t in sd.values() if hasattr(t, "dtype")]
        out.update(iteration=ckpt.iteration, tp=ckpt.tp, pp=ckpt.pp, vpp=ckpt.vpp,
                   name_style=detect_name_style(ckpt.models(0, 0)[0]), optimizer_state=ckpt.has_optimizer_state,
                   stored_elements=sum(t.numel() for t in tensors),
                   dtypes=dict(collections.Counter(str(t.dtype).replace("torch.", "") for t in tensors)))
    else:
        common = torch_dist_format.validate(path, allow_globals, light=peek)
        args = common["args"]
        cfg = canonical_from_args(args, base)
        tp, pp, vpp = parallel_sizes(args)
        index = torch_dist_format.tensor_index(path, allow_globals, light=peek)
        model = {k: v for k, v in index.items() if not k.startswith("optimizer")}
        out.update(iteration=legacy_format.read_tracker(path), tp=tp, pp=pp, vpp=vpp,
                   name_style=f"torch_dist global keys (saved by transformer_impl={getattr(args, 'transformer_impl', '?')})",
                   optimizer_state=len(model) != len(index) or "optimizer" in common,
                   stored_elements=sum(math.prod(s) for s, _ in model.values()),
                   dtypes=dict(collections.Counter(d for _, d in model.values())))
    out.update(config=cfg.to_dict(), parameters=_count(cfg))
    return out


def render(info: dict[str, Any]) -> str:
    def human(n: int) -> str:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if n < 1024 or unit == "TB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1024
        return str(n)

    cfg = info["config"]
    layout = "-" if info["tp"] is None else f"TP={info['tp']} PP={info['pp']} VPP={info['vpp']}"
    rows = [
        ("format", info["format"]), *([("storage", info["storage"])] if info.get("storage") else []),
        ("family", info.get("family") or "-"),
        ("iteration", "release" if info["iteration"] is None and info["format"] != "hf" else info["iteration"] or "-"),
        ("parallel layout", layout), ("parameter names", info["name_style"]),
        ("parameters", f"{info['parameters']:,} (unpadded vocab, tied weights once)"),
        ("stored elements", f"{info['stored_elements']:,}"),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))),
        ("bytes on disk", f"{info['bytes_on_disk']:,} ({human(info['bytes_on_disk'])})"),
        ("optimizer state", ("present; " + OPTIMIZER_NOTE) if info["optimizer_state"] else "absent"),
        ("architecture", f"layers={cfg['num_layers']} hidden={cfg['hidden_size']} ffn={cfg['intermediate_size']} "
                         f"heads={cfg['num_attention_heads']} kv_heads={cfg['num_key_value_heads']} "
                         f"head_dim={cfg['head_dim']} vocab={cfg['vocab_size']}"),
        ("", f"tied={cfg['tie_word_embeddings']} qkv_bias={cfg['qkv_bias']} o_bias={cfg['o_bias']} "
             f"qk_norm={cfg['qk_norm']} act={cfg['hidden_act']} rope_theta={cfg['rope_theta']} "
             f"rope_scaling={cfg['rope_scaling']} eps={cfg['rms_norm_eps']} dtype={cfg['dtype']}"),
    ]
    if cfg.get("task") == "sequence_classification":
        rows.append(("head", f"score.weight, num_labels={cfg['num_labels']} (sequence classification: a reward "
                             f"model when 1), no lm_head"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
