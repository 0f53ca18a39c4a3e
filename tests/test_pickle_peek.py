"""`inspect` without torch: the stand-in unpickler (checkpoint_tools.pickle_peek) must describe a checkpoint exactly
as the torch loaders do, vet it by the same policy, and never import what a pickle names.

Checkpoints: the upstream Megatron-LM fixtures (legacy TP=2 PP=2, PP=2, trained with optimizer and RNG state,
torch_dist with common.pt) and the megatron-core 0.19 torch_dist fixture (common state inside the .distcp files),
plus bf16 checkpoints converted here: legacy with TE names at PP=2 VPP=2, torch_dist at TP=2.
"""
from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.pickle_peek import StandIn, TensorRecord, peek_pickle_file, peek_torch_file
from checkpoint_tools.pickle_trust import load_pickle_file, load_torch_file
from conftest import ROOT, make_llama
from megatron_bridge import torch_dist_format
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.inspect_checkpoint import inspect, render

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
UPSTREAM = [os.path.join(FIXTURES, "megatron_lm", n) for n in ("llama_tp2pp2", "qwen2_tp1pp2", "qwen2_trained",
                                                                 "qwen2_dist")]
CORE_019 = os.path.join(FIXTURES, "megatron_core_019", "checkpoint")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("peek")
    hf = make_llama(str(root / "hf"), seed=3, dtype=torch.bfloat16)
    legacy, dist = str(root / "legacy_vpp_te"), str(root / "dist_tp2")
    convert(hf, legacy, ConvertOptions(pp=2, vpp=2, name_style="te", progress=False))
    convert(hf, dist, ConvertOptions(format="torch_dist", tp=2, progress=False))
    return [legacy, dist]


def _all_checkpoints(converted):
    return UPSTREAM + [CORE_019] + converted


def test_torch_free_inspect_reports_what_the_torch_loaders_report(converted):
    for path in _all_checkpoints(converted):
        light, full = inspect(path), inspect(path, peek=False)
        assert light == full, path
        assert render(light) == render(full)
    assert {inspect(p)["format"] for p in _all_checkpoints(converted)} == {"megatron_legacy", "megatron_torch_dist"}
    assert "bfloat16" in inspect(converted[0])["dtypes"] and inspect(converted[0])["vpp"] == 2


def _plain(value):
    """A loaded value with tensors as (shape, dtype name) and torch values as their printed names."""
    if isinstance(value, (torch.Tensor, TensorRecord)):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or type(value).__name__ == "TorchName":
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tensors(value, where="") -> list:
    """(where, shape, dtype name) of every tensor in a loaded payload's dicts, lists and tuples."""
    if isinstance(value, (torch.Tensor, TensorRecord)):
        return [(where, tuple(value.shape), str(value.dtype))]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [t for k, v in items for t in _tensors(v, f"{where}/{k}")]


def test_rank_files_peek_to_the_shapes_dtypes_and_args_torch_loads():
    files = sorted(glob.glob(os.path.join(FIXTURES, "megatron_lm", "*", "iter_*", "mp_rank_*", "*.pt")))
    files += glob.glob(os.path.join(FIXTURES, "megatron_lm", "qwen2_dist", "iter_*", "common.pt"))
    assert len(files) >= 7
    for path in files:
        light, full = peek_torch_file(path), load_torch_file(path)
        assert set(light) == set(full), path
        for key in ("model", "model0", "model1"):
            if key in full:
                assert _plain(light[key]) == _plain(dict(full[key])), (path, key)
        for name, value in vars(full["args"]).items():  # enums stand in; every plain value is the same
            peeked = getattr(light["args"], name)
            if isinstance(peeked, StandIn):
                assert type(peeked).__name__ == type(value).__name__, name
            else:
                assert _plain(peeked) == _plain(value), name
        assert _tensors(light) == _tensors(full), path  # everywhere, optimizer state and RNG included
    assert any("optimizer" in peek_torch_file(p) for p in files)


def test_dcp_index_peeks_to_the_same_tensor_index(converted):
    for root in [UPSTREAM[3], CORE_019, converted[1]]:
        light = torch_dist_format.tensor_index(root, light=True)
        assert light == torch_dist_format.tensor_index(root) and light, root
        path = os.path.join(torch_dist_format.iteration_dir(root), ".metadata")
        md, ref = peek_pickle_file(path), load_pickle_file(path)
        assert sorted((k.fqn, v.relative_path, v.offset, v.length) for k, v in md.storage_data.items()) == sorted(
            (k.fqn, v.relative_path, v.offset, v.length) for k, v in ref.storage_data.items())


# {"x": wb_never_imported.Thing()} by hand (PROTO 2, EMPTY_DICT, 'x', GLOBAL, EMPTY_TUPLE, NEWOBJ, SETITEM, STOP):
# a global of a module that does not exist, so importing it would fail loudly.
ELSEWHERE = b"\x80\x02}X\x01\x00\x00\x00xcwb_never_imported\nThing\n)\x81s."


def test_trusted_global_stands_in_without_its_module_being_imported(tmp_path):
    path = str(tmp_path / "index.pkl")
    with open(path, "wb") as f:
        f.write(ELSEWHERE)
    with pytest.raises(CheckpointError, match=r"wb_never_imported\.Thing; pass --allow-global"):
        peek_pickle_file(path)  # the default policy: refused by name
    got = peek_pickle_file(path, ["wb_never_imported.Thing"])["x"]
    assert isinstance(got, StandIn) and got.origin == ("wb_never_imported", "Thing")
    assert "wb_never_imported" not in sys.modules
    with pytest.raises(CheckpointError, match="cannot be imported|No module named"):
        load_pickle_file(path, ["wb_never_imported.Thing"])  # the torch-side loader imports what it builds
