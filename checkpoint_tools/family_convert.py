"""Hugging Face family -> Hugging Face family, through the canonical form: `qwen2 -> llama`, `llama -> qwen2`, ...

Two table lookups and no per-pair code: the source family's table reads the folder into canonical tensors
(streaming, unpacking and folding on the way), the target family's table proves it can express the model (refusing
by name what it cannot) and writes it. The source config becomes the base of the target config only when both are
the same family; otherwise the target family writes its own keys and keeps only the source's bookkeeping keys.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from checkpoint_tools.canonical import CastSource, TensorSource
from checkpoint_tools.families import get_family
from checkpoint_tools.hf_checkpoint import HFSource, write_hf_checkpoint


def convert_family(src: str, dst: str, to: str, *, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                   max_shard_bytes: int = 2 * 1024**3, force: bool = False, progress: bool = True,
                   allow_globals: Iterable[str] = ()) -> str:
    """Convert the HF checkpoint folder `src` (any supported family) into family `to` at `dst`. Returns `dst`.

    Raises ValueError naming the feature when `to` cannot express the model (nothing is written then).
    `allow_globals`: pickled globals ('MODULE.NAME', --allow-global) trusted in a pytorch_model.bin source.
    """
    target = get_family(to)
    source = HFSource(src, policy=allow_globals)
    same = source.family.model_type == target.model_type
    cast: TensorSource = CastSource(source, getattr(torch, dtype)) if dtype else source
    return write_hf_checkpoint(cast, dst, target, base_config=source.hf_config if same else None,
                               carry_config=None if same else source.hf_config, assets_dir=tokenizer or src,
                               max_shard_bytes=max_shard_bytes, force=force, progress=progress)
