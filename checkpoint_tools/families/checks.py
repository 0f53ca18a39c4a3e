"""Refusals several families share: features of a source config that the canonical decoder cannot express, and
rope scalings a target family's code cannot run. Each raises naming the feature; nothing is converted."""
from __future__ import annotations

from typing import Callable

from checkpoint_tools.canonical import CanonicalConfig


def refuse_sliding_window(hf: dict) -> None:
    """Sliding-window attention changes outputs past the window; canonical (and Llama) attend to everything."""
    window = hf.get("sliding_window")
    limit = hf.get("max_position_embeddings")
    if hf.get("use_sliding_window", True) and window is not None and (limit is None or window < limit):
        raise ValueError(f"sliding-window attention (sliding_window={window} < max_position_embeddings={limit}) "
                         f"cannot be expressed by the canonical (Llama-shaped) decoder; nothing was converted")
    other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types {other} (not full attention) cannot be expressed by the canonical decoder; "
                         f"nothing was converted")



def rope_scaling_limited_to(family: str, *types: str) -> Callable[[CanonicalConfig], None]:
    """A check_canonical for families whose code knows only some rope scalings (Phi-3: LongRoPE; InternLM2)."""
    def check(cfg: CanonicalConfig) -> None:
        kind = (cfg.rope_scaling or {}).get("rope_type")
        if cfg.rope_scaling and kind not in types:
            raise ValueError(f"{family} cannot express rope scaling of type {kind!r} (its code knows "
                             f"{list(types) or 'none'}); nothing was written")
    return check
