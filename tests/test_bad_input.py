"""Bad input gets a clear error and loses nothing: no destination, no half checkpoint left behind."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_llama
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import legacy_format
from megatron_bridge.convert import ConvertOptions, detect_format, hf_to_megatron, megatron_to_hf


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


@pytest.fixture
def mg(tmp_path, tiny_llama):
    path = str(tmp_path / "mg")
    hf_to_megatron(tiny_llama, path, ConvertOptions(tp=2, pp=2, progress=False))
    return path


@pytest.mark.parametrize("tp,pp,match", [
    (3, 1, r"num_attention_heads=4 is not divisible by TP=3.*use TP in \[1, 2, 4\]"),
    (8, 1, r"num_attention_heads=4 is not divisible by TP=8"),
    (1, 3, r"num_layers=4 is not divisible by PP\*VPP=3\*1; with VPP=1 use PP in \[1, 2, 4\]"),
])
def test_wrong_parallel_sizes(tmp_path, tiny_llama, tp, pp, match):
    dst = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        hf_to_megatron(tiny_llama, dst, ConvertOptions(tp=tp, pp=pp, progress=False))
    assert not os.path.exists(dst) and not _leftovers(str(tmp_path))


def test_existing_destination_refused_then_forced(tmp_path, tiny_llama, mg):
    marker = os.path.join(mg, "keep.txt")
    open(marker, "w").write("x")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_megatron(tiny_llama, mg, ConvertOptions(tp=1, pp=1, progress=False))
    assert os.path.exists(marker)
    hf_to_megatron(tiny_llama, mg, ConvertOptions(tp=1, pp=1, force=True, progress=False))
    assert not os.path.exists(marker) and legacy_format.open_legacy(mg).tp == 1


def test_unknown_hf_tensor_is_listed_not_dropped(tmp_path, tiny_llama):
    path = os.path.join(tiny_llama, "model.safetensors")
    ts = load_file(path)
    ts["model.layers.0.self_attn.mystery.weight"] = torch.zeros(3)
    save_file(ts, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="mystery"):
        hf_to_megatron(tiny_llama, str(tmp_path / "out"), ConvertOptions(progress=False))
    assert not os.path.exists(tmp_path / "out")


def test_missing_hf_tensor_is_listed(tmp_path, tiny_llama):
    path = os.path.join(tiny_llama, "model.safetensors")
    ts = load_file(path)
    del ts["model.layers.1.mlp.up_proj.weight"]
    save_file(ts, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
        hf_to_megatron(tiny_llama, str(tmp_path / "out"), ConvertOptions(progress=False))


def test_unknown_config_field_is_reported(tmp_path, tiny_llama):
    import json
    cfg_path = os.path.join(tiny_llama, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["sliding_window"] = 64
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"does not know: \['sliding_window'\]"):
        hf_to_megatron(tiny_llama, str(tmp_path / "out"), ConvertOptions(progress=False))


def test_missing_rank_folder_is_named(tmp_path, mg):
    import shutil
    shutil.rmtree(os.path.join(mg, "release", "mp_rank_01_001"))
    with pytest.raises(CheckpointError, match="mp_rank_01_001"):
        megatron_to_hf(mg, str(tmp_path / "back"), ConvertOptions(progress=False))
    assert not os.path.exists(tmp_path / "back")


def test_truncated_rank_file(tmp_path, mg):
    path = os.path.join(mg, "release", "mp_rank_00_001", "model_optim_rng.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        megatron_to_hf(mg, str(tmp_path / "back"), ConvertOptions(progress=False))
    assert not os.path.exists(tmp_path / "back")


class Payload:  # a global the allow-list does not know
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_pickle_is_refused(tmp_path, mg, capsys):
    path = os.path.join(mg, "release", "mp_rank_00_000", "model_optim_rng.pt")
    payload = torch.load(path, weights_only=False)
    payload["evil"] = Payload()
    torch.save(payload, path)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="allow-list"):
        megatron_to_hf(mg, str(tmp_path / "back"), ConvertOptions(progress=False))
    assert "this must never run" not in capsys.readouterr().out


def test_unknown_megatron_parameter_is_listed(tmp_path, mg):
    path = os.path.join(mg, "release", "mp_rank_00_000", "model_optim_rng.pt")
    payload = torch.load(path, weights_only=False)
    payload["model"]["decoder.layers.0.self_attention.extra_gate.weight"] = torch.zeros(2)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="extra_gate"):
        megatron_to_hf(mg, str(tmp_path / "back"), ConvertOptions(progress=False))


def test_crash_mid_write_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    from checkpoint_tools import hf_checkpoint
    calls = {"n": 0}
    real = hf_checkpoint.HFSource.get

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk went away")
        return real(self, name)

    monkeypatch.setattr(hf_checkpoint.HFSource, "get", flaky)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_megatron(tiny_llama, str(tmp_path / "out"), ConvertOptions(tp=2, pp=2, progress=False))
    assert not os.path.exists(tmp_path / "out") and not _leftovers(str(tmp_path))


def test_not_a_checkpoint_and_mixed_formats(tmp_path, tiny_llama, mg):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint"):
        detect_format(str(empty))
    open(os.path.join(tiny_llama, legacy_format.TRACKER), "w").write("release")
    with pytest.raises(CheckpointError, match="more than one checkpoint format"):
        detect_format(tiny_llama)


def test_nonzero_bias_the_target_lacks_is_refused(tmp_path):
    """Qwen2-style q/k/v bias with add_bias_linear forced on: a trained nonzero o bias cannot go to a model
    without o_proj bias."""
    from megatron_bridge.sidecar import read_sidecar, write_sidecar
    from checkpoint_tools.canonical import CanonicalConfig
    hf = make_llama(str(tmp_path / "hf"), attention_bias=True)
    mg = str(tmp_path / "mg")
    hf_to_megatron(hf, mg, ConvertOptions(tp=1, pp=1, progress=False))
    side = read_sidecar(mg)
    cfg = CanonicalConfig.from_dict(side["canonical_config"])
    cfg.o_bias = False  # pretend the source had no o bias: the Megatron one is now "extra"
    write_sidecar(mg, cfg, family=side["family"], hf_config=side["source_hf_config"], name_style="local")
    with pytest.raises(ValueError, match=r"linear_proj|o_proj.bias is nonzero"):
        megatron_to_hf(mg, str(tmp_path / "back"), ConvertOptions(progress=False))
