"""Hugging Face checkpoints stored as `pytorch_model.bin` (single or sharded): read through the pickle trust policy,
converted to Megatron and back to safetensors bit for bit; hostile, truncated and missing shards refused, nothing
written; safetensors preferred when both are present; `inspect` names the storage."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from conftest import make_llama
from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.hf_checkpoint import HFSource
from checkpoint_tools.safetensors_io import SafetensorsDir
from checkpoint_tools.torch_bin_io import BIN_INDEX_NAME, BIN_NAME, TorchBinDir
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.inspect_checkpoint import inspect
from megatron_bridge.verify import compare_hf_dirs
from test_hostile_pickles import HOSTILE, _zip_with


def _without_weights(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return dst


def _state_dict(hf: str) -> dict:
    """What `transformers` itself holds for the checkpoint (the state dict a .bin writer saves)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    hf = make_llama(str(root / "hf"), seed=11)
    sd = _state_dict(hf)
    single = _without_weights(hf, str(root / "single"))
    torch.save(sd, os.path.join(single, BIN_NAME))
    sharded = _without_weights(hf, str(root / "sharded"))
    names = list(sd)
    parts = [names[i::3] for i in range(3)]  # interleaved, so a layer's tensors span shards
    weight_map = {}
    for i, part in enumerate(parts):
        fn = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({n: sd[n] for n in part}, os.path.join(sharded, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(sharded, BIN_INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return {"root": root, "hf": hf, "single": single, "sharded": sharded, "sd": sd}


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_bin_to_megatron_to_safetensors_equals_source(kind, bins, tmp_path):
    src = bins[kind]
    weights = HFSource(src).weights
    assert isinstance(weights, TorchBinDir) and len(weights.files) == (1 if kind == "single" else 3)
    mg = str(tmp_path / "mg")
    convert(src, mg, ConvertOptions(tp=2, progress=False))
    back = str(tmp_path / "back")
    convert(mg, back, ConvertOptions(progress=False))
    assert os.path.exists(os.path.join(back, "model.safetensors")) or os.path.exists(
        os.path.join(back, "model.safetensors.index.json"))
    for reference in (bins["hf"], src):  # the safetensors original, and the .bin folder itself
        rt = compare_hf_dirs(reference, back)
        assert rt.ok and rt.tensors_equal == rt.tensors_total == len(bins["sd"]), (rt.mismatched, rt.missing)


def test_inspect_names_the_storage(bins):
    assert inspect(bins["single"])["storage"] == "pytorch_model.bin (1 file)"
    assert inspect(bins["sharded"])["storage"] == "pytorch_model.bin (3 files)"
    assert inspect(bins["hf"])["storage"] == "safetensors (1 file)"


def test_safetensors_wins_when_both_exist(bins, tmp_path, caplog):
    both = str(tmp_path / "both")
    shutil.copytree(bins["hf"], both)
    torch.save({k: torch.zeros_like(v) for k, v in bins["sd"].items()}, os.path.join(both, BIN_NAME))
    with caplog.at_level(logging.WARNING):
        src = HFSource(both)
    assert isinstance(src.weights, SafetensorsDir)
    assert "reading the safetensors" in caplog.text
    name = "model.embed_tokens.weight"
    assert torch.equal(src.weights.get(name), bins["sd"][name])


def _refused_and_nothing_written(src: str, tmp_path, match: str) -> None:
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=match):
        convert(src, dst, ConvertOptions(tp=2, progress=False))
    assert not os.path.exists(dst) and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_hostile_bin_refused(kind, bins, tmp_path):
    marker = str(tmp_path / "PWNED")
    src = str(tmp_path / "src")
    shutil.copytree(bins[kind], src)
    victim = BIN_NAME if kind == "single" else "pytorch_model-00002-of-00003.bin"
    _zip_with(HOSTILE["STACK_GLOBAL os.system"][0](marker), os.path.join(src, victim))
    _refused_and_nothing_written(src, tmp_path, rf"{victim}: refused to unpickle globals outside the allow-list: "
                                                rf"os\.system; pass --allow-global")
    assert not os.path.exists(marker)


def test_truncated_shard_and_missing_shard(bins, tmp_path):
    trunc = tmp_path / "t"
    trunc.mkdir()
    src = str(trunc / "src")
    shutil.copytree(bins["sharded"], src)
    shard = os.path.join(src, "pytorch_model-00003-of-00003.bin")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    _refused_and_nothing_written(src, trunc, r"pytorch_model-00003-of-00003\.bin: truncated")

    miss = tmp_path / "m"
    miss.mkdir()
    src = str(miss / "src")
    shutil.copytree(bins["sharded"], src)
    os.remove(os.path.join(src, "pytorch_model-00001-of-00003.bin"))
    _refused_and_nothing_written(src, miss, r"shards listed in pytorch_model\.bin\.index\.json are missing: "
                                            r"\['pytorch_model-00001-of-00003\.bin'\]")


def test_folder_without_known_weights_says_what_it_looked_for(bins, tmp_path):
    src = _without_weights(bins["hf"], str(tmp_path / "src"))
    torch.save(bins["sd"], os.path.join(src, "model.pt"))
    with pytest.raises(CheckpointError, match=r"no weights: looked for model\.safetensors\.index\.json, "
                                              r"model\.safetensors, pytorch_model\.bin\.index\.json, "
                                              r"pytorch_model\.bin; found \['model\.pt'\]"):
        inspect(src)
    os.remove(os.path.join(src, "model.pt"))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        convert(src, str(tmp_path / "out"), ConvertOptions(tp=2, progress=False))
    assert not os.path.exists(tmp_path / "out")


def test_allow_global_reaches_the_bin_reader_of_every_command(bins, tmp_path):
    """A .bin whose pickle needs one global beyond the allow-list (a tensor carrying a Fraction attribute): every
    command that reads the HF folder refuses it naming the global, and reads it when `--allow-global` trusts it."""
    from fractions import Fraction

    from megatron_bridge.verify import hf_logits, probe_tokens, verify
    from test_hostile_pickles import _cli

    src = _without_weights(bins["hf"], str(tmp_path / "src"))
    sd = dict(bins["sd"])
    sd["model.norm.weight"] = sd["model.norm.weight"].clone()
    sd["model.norm.weight"].scale = Fraction(1, 3)  # a harmless class outside the allow-list
    torch.save(sd, os.path.join(src, BIN_NAME))
    trust = ("fractions.Fraction",)
    refusal = r"fractions\.Fraction; pass --allow-global"

    with pytest.raises(CheckpointError, match=refusal):
        inspect(src)
    assert inspect(src, allow_globals=trust)["storage"] == "pytorch_model.bin (1 file)"
    for opts, to, name in ((ConvertOptions(tp=2, progress=False), None, "mg"),
                           (ConvertOptions(progress=False), "qwen2", "qwen")):
        with pytest.raises(CheckpointError, match=refusal):
            convert(src, str(tmp_path / name), opts, to=to)
        assert not os.path.exists(tmp_path / name)
        opts.allow_globals = trust
        convert(src, str(tmp_path / name), opts, to=to)
    assert compare_hf_dirs(src, str(tmp_path / "qwen"), trust).tensors_equal > 0
    # verify: the round trip reads the .bin source, and the reference model gets its weights through the policy
    with pytest.raises(CheckpointError, match=refusal):
        verify(src, str(tmp_path / "mg"), logits=False)
    assert verify(src, str(tmp_path / "mg"), logits=False, allow_globals=trust).ok
    tokens = probe_tokens(bins["sd"]["model.embed_tokens.weight"].shape[0])
    assert torch.equal(hf_logits(src, tokens, trust), hf_logits(bins["hf"], tokens))
    # the command line: refused without the option, converted with it
    proc = _cli("convert", src, str(tmp_path / "cli"), "--to", "llama", "--no-progress")
    assert proc.returncode != 0 and "fractions.Fraction" in proc.stderr and not os.path.exists(tmp_path / "cli")
    proc = _cli("convert", src, str(tmp_path / "cli"), "--to", "llama", "--no-progress",
                "--allow-global", "fractions.Fraction")
    assert proc.returncode == 0, proc.stderr
    assert compare_hf_dirs(bins["hf"], str(tmp_path / "cli")).ok
