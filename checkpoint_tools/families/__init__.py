"""Registry of model families by Hugging Face `model_type`: one declarative table per family.

`get_family` also answers to each family's aliases (`qwen` -> qwen2, `baichuan2` -> baichuan, `yi` -> Yi), case
insensitively, and lists what is supported when a name is unknown.
"""
from __future__ import annotations

from checkpoint_tools.families.family import Family
from checkpoint_tools.families import (baichuan, gemma, granite, internlm2, internlm3, llama, mistral, phi3, qwen2,
                                       qwen3, workbench, yi)

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    llama.FAMILY, mistral.FAMILY, yi.FAMILY, qwen2.FAMILY, qwen3.FAMILY, phi3.FAMILY, gemma.FAMILY, granite.FAMILY,
    internlm3.FAMILY, internlm2.FAMILY, baichuan.FAMILY, workbench.FAMILY]}
_BY_NAME: dict[str, Family] = {n.lower(): f for f in FAMILIES.values() for n in (f.model_type, *f.aliases)}


def get_family(model_type: str) -> Family:
    fam = FAMILIES.get(model_type) or _BY_NAME.get(str(model_type).lower())
    if fam is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)} "
                         f"(aliases: {sorted(n for n in _BY_NAME if n not in FAMILIES)})")
    return fam


def family_names() -> list[str]:
    """Every name `get_family` accepts: model types and aliases."""
    return sorted(set(FAMILIES) | set(_BY_NAME))
