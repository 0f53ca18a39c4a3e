"""torch_dist checkpoints: written and read through megatron.core.dist_checkpointing, resharded at load by real
megatron-core, bit-exact round trips with legacy and Hugging Face; `inspect` on every format; bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_no_unexpected_warnings, cli_env, make_llama
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import legacy_format
from megatron_bridge.convert import ConvertOptions, convert, detect_format
from megatron_bridge.inspect_checkpoint import inspect
from megatron_bridge.mcore_launcher import run_mcore_jobs
from megatron_bridge.verify import compare_hf_dirs, compare_logits, hf_logits, probe_tokens


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_dist")
    hf = make_llama(str(root / "hf"), seed=7, tie_word_embeddings=True)
    td = str(root / "td_tp2")
    what, _ = convert(hf, td, ConvertOptions(tp=2, pp=1, format="torch_dist", progress=False))
    assert what == "hf -> megatron torch_dist"
    return {"root": root, "hf": hf, "td": td}


def test_format_detected_and_files_present(ckpts):
    assert detect_format(ckpts["td"]) == "megatron_torch_dist"
    it = os.path.join(ckpts["td"], "release")
    names = os.listdir(it)
    assert {"metadata.json", "common.pt", ".metadata"} <= set(names)
    assert any(n.endswith(".distcp") for n in names)
    assert json.load(open(os.path.join(it, "metadata.json")))["sharded_backend"] == "torch_dist"


def test_reshard_at_load_logits_match_hf(ckpts):
    """Saved at TP=2 PP=1, loaded by megatron-core at TP=1 PP=2 (and at its own layout): HF's logits."""
    tokens = probe_tokens(250, batch=2, seq_len=32, seed=3)
    ref = hf_logits(ckpts["hf"], tokens)
    (pp2,) = run_mcore_jobs([{"checkpoint": ckpts["td"], "task": "logits", "tokens": tokens.tolist(),
                              "tp": 1, "pp": 2}], nproc=2)
    (tp2,) = run_mcore_jobs([{"checkpoint": ckpts["td"], "task": "logits", "tokens": tokens.tolist()}], nproc=2)
    for res in (pp2, tp2):
        rep = compare_logits(ref, res["logits"], 1e-4)
        assert rep.ok and rep.argmax_agree == rep.positions, rep


def test_round_trips_bit_exact(ckpts):
    root, hf, td = ckpts["root"], ckpts["hf"], ckpts["td"]
    # torch_dist -> HF
    back = str(root / "back_from_td")
    convert(td, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(hf, back)
    assert rt.ok and rt.tensors_equal == rt.tensors_total > 0, (rt.mismatched, rt.config_diff)
    # torch_dist (TP2 PP1) -> legacy at TP1 PP2 (resharded at load) -> HF
    leg = str(root / "legacy_pp2")
    what, _ = convert(td, leg, ConvertOptions(tp=1, pp=2, format="legacy", progress=False))
    assert what == "megatron torch_dist -> megatron legacy"
    ck = legacy_format.open_legacy(leg)
    assert (ck.tp, ck.pp) == (1, 2)
    back2 = str(root / "back_from_legacy")
    convert(leg, back2, ConvertOptions(progress=False))
    assert compare_hf_dirs(hf, back2).ok
    # The legacy files megatron-core wrote equal the ones streamed straight from HF.
    direct = str(root / "direct_pp2")
    convert(hf, direct, ConvertOptions(tp=1, pp=2, progress=False))
    streamed = legacy_format.open_legacy(direct)
    for key in streamed.ranks:
        a, b = ck.models(*key)[0], streamed.models(*key)[0]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # legacy -> torch_dist (same layout) -> HF
    td2 = str(root / "td_from_legacy")
    what, _ = convert(leg, td2, ConvertOptions(format="torch_dist", progress=False))
    assert what == "megatron legacy -> megatron torch_dist"
    back3 = str(root / "back_from_td2")
    convert(td2, back3, ConvertOptions(progress=False))
    assert compare_hf_dirs(hf, back3).ok


def test_inspect_every_format(ckpts):
    from transformers import AutoModelForCausalLM
    root = ckpts["root"]
    hf_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ckpts["hf"]).parameters())
    leg = str(root / "legacy_for_inspect")
    convert(ckpts["hf"], leg, ConvertOptions(tp=2, pp=2, name_style="te", progress=False))
    expect = {ckpts["hf"]: ("hf", None, None), leg: ("megatron_legacy", 2, 2), ckpts["td"]: ("megatron_torch_dist", 2, 1)}
    for path, (fmt, tp, pp) in expect.items():
        info = inspect(path)
        assert (info["format"], info["tp"], info["pp"]) == (fmt, tp, pp)
        assert info["parameters"] == hf_params
        assert info["optimizer_state"] is False and info["bytes_on_disk"] > 0
    assert inspect(leg)["name_style"] == "te"
    r = subprocess.run([sys.executable, "-m", "launch", "inspect", ckpts["td"], "--json"], cwd=ROOT,
                       capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert_no_unexpected_warnings(r.stderr)
    data = json.loads(r.stdout)
    assert data["tp"] == 2 and data["pp"] == 1 and data["parameters"] == hf_params


def test_optimizer_state_is_reported_and_dropped_with_a_warning(ckpts, caplog):
    root = ckpts["root"]
    leg = str(root / "with_optim")
    convert(ckpts["hf"], leg, ConvertOptions(tp=1, pp=1, progress=False))
    path = os.path.join(leg, "release", "mp_rank_00", "model_optim_rng.pt")
    payload = torch.load(path, weights_only=False)
    payload["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}
    torch.save(payload, path)
    info = inspect(leg)
    assert info["optimizer_state"] is True
    with caplog.at_level("WARNING"):
        convert(leg, str(root / "with_optim_back"), ConvertOptions(progress=False))
    assert "optimizer state" in caplog.text and "drops it" in caplog.text


def test_missing_or_truncated_shard_and_mixed_formats(ckpts, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpts["td"], bad)
    shard = sorted(n for n in os.listdir(os.path.join(bad, "release")) if n.endswith(".distcp"))[-1]
    os.remove(os.path.join(bad, "release", shard))
    with pytest.raises(CheckpointError, match=f"{shard} is missing"):
        convert(bad, str(tmp_path / "out"), ConvertOptions(progress=False))
    assert not os.path.exists(tmp_path / "out")
    shutil.copyfile(os.path.join(ckpts["td"], "release", shard), os.path.join(bad, "release", shard))
    with open(os.path.join(bad, "release", shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=f"{shard} is truncated"):
        inspect(bad)
    shutil.copyfile(os.path.join(ckpts["td"], "release", shard), os.path.join(bad, "release", shard))
    os.makedirs(os.path.join(bad, "release", "mp_rank_00"))
    with pytest.raises(CheckpointError, match="both torch_dist files and legacy"):
        convert(bad, str(tmp_path / "out"), ConvertOptions(progress=False))
    assert not os.path.exists(tmp_path / "out") and not [n for n in os.listdir(tmp_path) if "scratch" in n]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        inspect(str(empty))


def test_verify_accepts_torch_dist(ckpts):
    from megatron_bridge.verify import verify
    report = verify(ckpts["hf"], ckpts["td"], seq_len=16)
    assert report.ok, report.table()
    assert report.round_trip.tensors_equal == report.round_trip.tensors_total > 0
