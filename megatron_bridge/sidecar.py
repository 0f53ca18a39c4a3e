"""What we record next to a Megatron checkpoint so the way back to Hugging Face loses nothing.

Megatron-LM ignores unknown files in a checkpoint root, so `workbench.json` (canonical config, the source HF config,
the family, the parameter-name style) and `hf_assets/` (tokenizer and generation files) travel with it. A
checkpoint written by Megatron-LM alone has neither; conversion then relies on `args` and on user-given paths.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from checkpoint_tools.canonical import CanonicalConfig

SIDECAR = "workbench.json"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1


def write_sidecar(root: str, cfg: CanonicalConfig, *, family: Optional[str], hf_config: Optional[dict],
                  name_style: str, assets_from: Optional[str] = None) -> None:
    data = {"format_version": FORMAT_VERSION, "canonical_config": cfg.to_dict(), "family": family,
            "source_hf_config": hf_config, "name_style": name_style}
    with open(os.path.join(root, SIDECAR), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    if assets_from and os.path.isdir(assets_from):
        from checkpoint_tools.hf_checkpoint import copy_assets  # torch-heavy: `inspect` only reads the sidecar

        dst = os.path.join(root, ASSETS_DIR)
        os.makedirs(dst, exist_ok=True)
        copy_assets(assets_from, dst)


def read_sidecar(root: str) -> Optional[dict]:
    path = os.path.join(root, SIDECAR)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data.get('format_version')} is not {FORMAT_VERSION}")
    return data


def assets_dir(root: str) -> Optional[str]:
    d = os.path.join(root, ASSETS_DIR)
    return d if os.path.isdir(d) else None


def copy_sidecar(src_root: str, dst_root: str) -> None:
    for name in (SIDECAR, ASSETS_DIR):
        s = os.path.join(src_root, name)
        if os.path.isdir(s):
            shutil.copytree(s, os.path.join(dst_root, name))
        elif os.path.exists(s):
            shutil.copyfile(s, os.path.join(dst_root, name))
