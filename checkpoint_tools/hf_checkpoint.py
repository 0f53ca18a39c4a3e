"""Hugging Face checkpoint folders <-> canonical tensors, through a family table.

Reading maps every HF tensor name to exactly one canonical name or an explicit drop, and fails listing whatever is
unmatched. Writing streams canonical tensors into sharded safetensors with an index, a `config.json` made by the
family table over the source config recorded at import, a `generation_config.json`, and the tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING, Optional

from checkpoint_tools.atomic_dir import atomic_directory
from checkpoint_tools.canonical import CanonicalConfig, TensorSource, check_tensor_set, expected_tensor_names
from checkpoint_tools.families import get_family
from checkpoint_tools.families.family import Family
from checkpoint_tools.families.hf_tensor_check import hf_tensor_problems
from checkpoint_tools.safetensors_io import CheckpointError, ShardedSafetensorsWriter, TensorSpec
from checkpoint_tools.pickle_trust import PolicyLike
from checkpoint_tools.torch_bin_io import is_hf_checkpoint, open_hf_weights  # noqa: F401 - is_hf_checkpoint: API

if TYPE_CHECKING:  # reading a folder's config and headers needs no torch (`inspect`); tensors bring it
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Files that describe the tokenizer or generation defaults: carried over verbatim wherever a checkpoint goes.
ASSET_NAMES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "tokenizer.tiktoken", "qwen.tiktoken",
}


def read_hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def asset_files(path: str) -> list[str]:
    """Tokenizer and generation files in `path` (names only)."""
    return sorted(f for f in os.listdir(path) if f in ASSET_NAMES or f.startswith("chat_template"))


def copy_assets(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in asset_files(src_dir):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        copied.append(name)
    return copied


class HFSource(TensorSource):
    """Canonical view of a Hugging Face checkpoint folder (memory-mapped, nothing read up front).

    The family's links say which HF tensors make which canonical ones (renamed, split from a fused tensor, folded);
    the tensors of the last link read stay cached, so q, k and v of one fused tensor cost one read.
    """

    def __init__(self, path: str, family: Optional[Family] = None, policy: PolicyLike = None, *,
                 peek: bool = False):
        """`policy`: the pickle trust policy for pytorch_model.bin (or the 'MODULE.NAME' globals of --allow-global).
        `peek`: read pytorch_model.bin as shapes and dtypes without torch (`inspect`); every check below runs on
        headers alone either way, so a peeked source is checked exactly as a loaded one, but yields no tensors."""
        self.path = path
        self.hf_config = read_hf_config(path)
        self.family = family or get_family(self.hf_config.get("model_type", "?"))
        # safetensors, or pytorch_model.bin through the trust policy
        self.weights = open_hf_weights(path, policy, peek=peek)
        known = {n: self.family.knows_hf_name(n) for n in self.weights.names()}
        unknown = [n for n, k in known.items() if k is None]
        if unknown:
            raise CheckpointError(f"{path}: tensors no {self.family.model_type} mapping knows (never dropped "
                                  f"silently): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
        dtype = None
        embed = self.family.embed_hf_name()
        if embed in known:
            dtype = self.weights.shape_and_dtype(embed)[1]  # torch's name: 'bfloat16'
        self.config: CanonicalConfig = self.family.config_to_canonical(self.hf_config, dtype=dtype)
        self.config.extra["hf_model_type"] = self.family.model_type
        links = self.family.links(self.config, self.hf_config)
        present = {n: self.weights.shape_and_dtype(n)[0] for n, k in known.items() if k}
        problems = hf_tensor_problems(links, present, self.config)
        if problems:
            raise ValueError("checkpoint does not match its config: " + "; ".join(problems))
        self._where = {c: (link, j) for link in links for j, c in enumerate(link.canonical)}
        self._order = expected_tensor_names(self.config)
        self._cache: tuple = (None, None)

    def names(self) -> list[str]:
        return list(self._order)

    def get(self, name: str) -> torch.Tensor:
        link, j = self._where[name]
        if self._cache[0] is not link:
            self._cache = (link, link.to_canonical([self.weights.get(h) for h in link.hf]))
        return self._cache[1][j]

    def dtype_of(self, name: str) -> torch.dtype:
        return self.weights.spec(self._where[name][0].hf[0]).dtype

    def release(self) -> None:
        self._cache = (None, None)
        self.weights.release()


def default_generation_config(cfg: CanonicalConfig) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out


def write_hf_checkpoint(source: TensorSource, dst: str, family: Family, *, base_config: Optional[dict] = None,
                        assets_dir: Optional[str] = None, max_shard_bytes: int = 2 * 1024**3,
                        force: bool = False, progress: bool = True, carry_config: Optional[dict] = None) -> str:
    """Stream `source` into a new HF checkpoint folder `dst` (atomically). Returns `dst`.

    `base_config` is a config of the same family written over; `carry_config` one of another family, whose
    bookkeeping keys (initializer_range, use_cache, ...) are kept.
    """
    from tqdm import tqdm  # only writing shows progress; `inspect` reads this module without it

    cfg = source.config
    check_tensor_set(cfg, source.names())
    plan = family.plan_write(source, base_config, carry_config)  # refuses, naming it, what the family cannot express
    hf_config = plan.hf_config
    specs = [TensorSpec(name, shape, dtype) for name, shape, dtype in plan.specs()]
    with atomic_directory(dst, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes)
        for link in tqdm(plan.links, desc=f"writing {os.path.basename(dst)}", unit="tensor", disable=not progress):
            blocks = plan.parts(link)
            if blocks is not None:  # the tensor as the source holds it (e.g. TP shards), never built whole
                writer.write_parts(link.hf[0], *blocks)
            else:
                for name, t in zip(link.hf, link.to_hf(plan.inputs(link))):
                    writer.write(name, t)
            source.release()
        writer.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        copied = copy_assets(assets_dir, tmp) if assets_dir and os.path.isdir(assets_dir) else []
        if "generation_config.json" not in copied:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(default_generation_config(cfg), f, indent=2)
                f.write("\n")
    return dst
