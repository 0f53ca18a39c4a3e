"""Registry of model families by Hugging Face `model_type`: one declarative table per family."""
from __future__ import annotations

from checkpoint_tools.families.base import Family
from checkpoint_tools.families import llama

FAMILIES: dict[str, Family] = {f.model_type: f for f in [llama.FAMILY]}


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}") from None
