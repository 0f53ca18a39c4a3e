"""`inspect` of a Hugging Face folder without torch: the report must equal the torch-loaded one, and a folder that
does not match its config must be refused alike, from headers and peeked pickles alone.

Folders: Llama in bf16 as one safetensors file, the same in safetensors shards with an index, as one
`pytorch_model.bin` and as `.bin` shards with an index; Llama with tied embeddings; a Llama reward model
(`score.weight`); Qwen2 (q/k/v bias, tied), Gemma in bf16 (norm and embedding folds: canonical unties its tied head)
and Phi-3 (fused qkv and gate_up), each saved by its `transformers` class; InternLM2 (q/k/v packed per KV group)
and Baichuan2 (W_pack, NormHead) in their published layouts (tests/_remote_code_reference.py). Whether the command
line imports torch is checked by tests/test_startup_imports.py.
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from _remote_code_reference import write_checkpoint
from conftest import TINY, make_llama
from checkpoint_tools.canonical import CanonicalConfig, expected_shapes
from checkpoint_tools.dtype_names import round_to_dtype
from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.families import FAMILIES
from checkpoint_tools.families.mappings import Ctx
from checkpoint_tools.safetensors_io import SafetensorsDir, write_tensors, TensorSpec
from checkpoint_tools.torch_bin_io import BIN_INDEX_NAME, BIN_NAME
from megatron_bridge.inspect_checkpoint import inspect, render


def _copy_config(src: str, dst: str) -> str:
    os.makedirs(dst)
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    return dst


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    w = SafetensorsDir(folder)
    return {n: w.get(n).clone() for n in w.names()}


def _save_bins(sd: dict, dst: str, shards: int) -> None:
    if shards == 1:
        torch.save(sd, os.path.join(dst, BIN_NAME))
        return
    names, weight_map = list(sd), {}
    for i in range(shards):
        fn = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: sd[n] for n in names[i::shards]}, os.path.join(dst, fn))
        weight_map.update({n: fn for n in names[i::shards]})
    with open(os.path.join(dst, BIN_INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _save_model(cls: str, cfg_cls: str, path: str, dtype=torch.float32, **overrides) -> str:
    torch.manual_seed(sum(map(ord, cls)))
    getattr(transformers, cls)(getattr(transformers, cfg_cls)(**{**TINY, **overrides})).to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inspect_hf")
    out = {"llama_bf16": make_llama(str(root / "llama_bf16"), seed=4, dtype=torch.bfloat16)}
    sd = _tensors(out["llama_bf16"])
    sharded = _copy_config(out["llama_bf16"], str(root / "llama_sharded"))
    files = write_tensors(sharded, sd.items(), [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in sd.items()],
                          max_shard_bytes=60_000)
    assert len(files) > 2
    out["llama_sharded"] = sharded
    for name, shards in (("llama_bin", 1), ("llama_bin_sharded", 3)):
        out[name] = _copy_config(out["llama_bf16"], str(root / name))
        _save_bins(sd, out[name], shards)
    out["llama_tied"] = make_llama(str(root / "llama_tied"), seed=5, tie_word_embeddings=True)
    out["llama_reward"] = _save_model("LlamaForSequenceClassification", "LlamaConfig", str(root / "llama_reward"),
                                      num_labels=1, pad_token_id=0)
    out["qwen2_tied"] = _save_model("Qwen2ForCausalLM", "Qwen2Config", str(root / "qwen2"), tie_word_embeddings=True)
    out["gemma_bf16"] = _save_model("GemmaForCausalLM", "GemmaConfig", str(root / "gemma"), dtype=torch.bfloat16,
                                    head_dim=16, tie_word_embeddings=True)
    out["phi3"] = _save_model("Phi3ForCausalLM", "Phi3Config", str(root / "phi3"), pad_token_id=0)
    out["internlm2"] = write_checkpoint(str(root / "internlm2"), "internlm2", seed=1, num_attention_heads=8,
                                        num_key_value_heads=2)
    out["baichuan"] = write_checkpoint(str(root / "baichuan"), "baichuan", seed=2, num_attention_heads=8)
    return out


def _read_back(folder: str) -> list[tuple[tuple, str]]:
    """(shape, dtype name) of every stored tensor, read by the safetensors library or torch.load (not ours)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
    out = []
    for fn in files:
        path = os.path.join(folder, fn)
        if fn.endswith(".bin"):
            tensors = list(torch.load(path, weights_only=True).values())
        else:
            with safe_open(path, "pt") as f:
                tensors = [f.get_tensor(k) for k in f.keys()]
        out += [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in tensors]
    return out


def test_torch_free_report_equals_the_torch_report(folders):
    expected_family = {"llama_bf16": "llama", "llama_sharded": "llama", "llama_bin": "llama",
                       "llama_bin_sharded": "llama", "llama_tied": "llama", "llama_reward": "llama",
                       "qwen2_tied": "qwen2", "gemma_bf16": "gemma", "phi3": "phi3", "internlm2": "internlm2",
                       "baichuan": "baichuan"}
    assert set(expected_family) == set(folders)
    for name, folder in folders.items():
        light, full = inspect(folder), inspect(folder, peek=False)
        assert light == full, name
        assert render(light) == render(full), name
        stored = _read_back(folder)  # the numbers themselves, from readers that are not the project's
        assert light["family"] == expected_family[name], name
        assert light["stored_elements"] == sum(math.prod(s) for s, _ in stored), name
        assert light["dtypes"] == dict(collections.Counter(d for _, d in stored)), name
    shards = len([f for f in os.listdir(folders["llama_sharded"]) if f.endswith(".safetensors")])
    assert shards > 2 and inspect(folders["llama_sharded"])["storage"] == f"safetensors ({shards} files)"
    assert inspect(folders["llama_bin_sharded"])["storage"] == "pytorch_model.bin (3 files)"
    assert inspect(folders["llama_bin"])["dtypes"] == {"bfloat16": 39}
    assert inspect(folders["gemma_bf16"])["config"]["dtype"] == "bfloat16"
    # Gemma's embedding scale folds into canonical, so its tied head becomes a tensor of its own
    assert inspect(folders["gemma_bf16"])["config"]["tie_word_embeddings"] is False
    assert inspect(folders["qwen2_tied"])["config"]["tie_word_embeddings"] is True
    reward = inspect(folders["llama_reward"])
    assert reward["config"]["task"] == "sequence_classification" and reward["config"]["num_labels"] == 1
    # the same report as the folder's bf16 safetensors: only the storage line differs
    a, b = inspect(folders["llama_bf16"]), inspect(folders["llama_bin_sharded"])
    assert {k: v for k, v in a.items() if k not in ("path", "storage", "bytes_on_disk")} == \
        {k: v for k, v in b.items() if k not in ("path", "storage", "bytes_on_disk")}


def _with(src: str, dst: str, change) -> str:
    """A copy of folder `src` whose state dict went through `change` (saved as the source stores it)."""
    shutil.copytree(src, dst)
    if os.path.exists(os.path.join(dst, BIN_NAME)):
        path = os.path.join(dst, BIN_NAME)
        sd = torch.load(path, weights_only=True)
        change(sd)
        torch.save(sd, path)
    else:
        path = os.path.join(dst, "model.safetensors")
        sd = _tensors(dst)
        change(sd)
        save_file(sd, path, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("storage", ["llama_bf16", "llama_bin"])
def test_folders_that_do_not_match_their_config_are_refused_alike(storage, folders, tmp_path):
    src = folders[storage]
    unknown = _with(src, str(tmp_path / "unknown"), lambda sd: sd.update(
        {"model.layers.0.self_attn.extra.weight": torch.zeros(4, dtype=torch.bfloat16)}))
    wrong = _with(src, str(tmp_path / "wrong"), lambda sd: sd.update(
        {"model.layers.1.mlp.up_proj.weight": torch.zeros(97, 64, dtype=torch.bfloat16)}))
    missing = _with(src, str(tmp_path / "missing"), lambda sd: sd.pop("model.layers.2.self_attn.k_proj.weight"))
    for peek in (True, False):
        with pytest.raises(CheckpointError, match=r"tensors no llama mapping knows .*"
                                                  r"'model\.layers\.0\.self_attn\.extra\.weight'"):
            inspect(unknown, peek=peek)
        with pytest.raises(ValueError, match=r"shape mismatches \(1\): \[\"\['model\.layers\.1\.mlp\.up_proj\.weight'"
                                             r"\]: \[\(97, 64\)\] does not give \[\(96, 64\)\]\"\]"):
            inspect(wrong, peek=peek)
        with pytest.raises(ValueError, match=r"missing tensors \(1\): \['model\.layers\.2\.self_attn\.k_proj\.weight'"):
            inspect(missing, peek=peek)


def _hf_shapes(link, shapes: dict) -> list[tuple]:
    """The HF shapes of a link, from its canonical shapes run backwards on meta tensors (as a write plans them)."""
    metas = [torch.empty(shapes[c], device="meta") for c in link.canonical]
    return [tuple(t.shape) for t in link.to_hf(metas)]


def _variants(family) -> list[CanonicalConfig]:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8, dtype="bfloat16")
    out = []
    for tied in (False, True):
        out.append(CanonicalConfig(**base, tie_word_embeddings=tied, qkv_bias=tied))
    if family.classifier:
        out.append(CanonicalConfig(**base, task="sequence_classification", num_labels=1))
    return out


def test_shape_links_give_what_tensor_links_give_for_every_family():
    """The header check (`canonical_shapes`) against the tensor path it stands for (`to_canonical` on meta
    tensors), for every family's links: right shapes, and one row or column off, which both must reject."""
    checked = collections.Counter()
    for family in FAMILIES.values():
        for cfg in _variants(family):
            hf = family.config_from_canonical(family.widen(cfg))
            cfg_t = family.config_to_canonical(hf, dtype=cfg.dtype)
            shapes = expected_shapes(cfg_t)
            for link in family.links(cfg_t, hf):
                hf_shapes = _hf_shapes(link, shapes)
                for bent in (hf_shapes, [(s[0] + 1, *s[1:]) for s in hf_shapes],
                             [(*s[:-1], s[-1] + 1) for s in hf_shapes]):
                    metas = [torch.empty(s, device="meta") for s in bent]
                    try:
                        want = [tuple(t.shape) for t in link.to_canonical(metas)]
                    except (RuntimeError, ValueError):
                        want = None
                    try:
                        got = link.canonical_shapes(bent)
                    except ValueError:
                        got = None
                    assert got == want, (family.model_type, link.hf, bent)
                    assert (got == [shapes[c] for c in link.canonical]) == (bent is hf_shapes)
                checked[link.canonical_shapes.__qualname__.split(".<locals>")[0]] += 1
    # one-to-one, row splits (fused), q/k/v groups and the tied embedding pair all ran
    assert set(checked) == {"_same_shapes", "_split_rows", "GroupedQKV.links", "EmbeddingHead.links"}, checked


def test_gemma_embedding_scale_without_torch_rounds_as_torch():
    sizes = list(range(1, 9000))
    roots = torch.tensor([h ** 0.5 for h in sizes], dtype=torch.float64)
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        want = roots.to(torch.float32).to(getattr(torch, dtype)).tolist()
        assert [round_to_dtype(h ** 0.5, dtype) for h in sizes] == want, dtype
    assert round_to_dtype(3.0, "float8_e4m3fn") is None  # left to torch
    gemma = FAMILIES["gemma"]
    scale = gemma.embedding().embed_fold
    cfg = CanonicalConfig(vocab_size=96, hidden_size=2048, intermediate_size=80, num_layers=1, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=8, dtype="bfloat16")
    w = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    reference = w * torch.tensor(2048 ** 0.5, dtype=torch.float32).to(torch.bfloat16)  # GemmaScaledWordEmbedding
    assert torch.equal(scale.fold(w, Ctx(cfg, {})), reference)
