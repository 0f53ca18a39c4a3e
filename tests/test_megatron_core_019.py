"""torch_dist checkpoints written by megatron-core 0.17 to 0.19: no common.pt, the common state is a sharded byte
object `common_state` inside the .distcp files. The fixture (tests/fixtures/megatron_core_019, README there) was
written by megatron-core 0.19.2 on Python 3.12; these tests run on the installed megatron-core (0.16).

What is proved: the checkpoint validates, its common state and args read; it converts to Hugging Face bit-exact
against the tensors 0.19 held when it saved (an independent re-packing in this file, not our converter's tables);
real megatron-core loads it resharded with the converted model's logits; and a hostile or malformed common_state
object is refused by name before anything unpickles it.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env
from test_hostile_pickles import HOSTILE, MALFORMED_PICKLES, _zip_bytes
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import torch_dist_format
from megatron_bridge.convert import ConvertOptions, convert, detect_format
from megatron_bridge.inspect_checkpoint import inspect
from megatron_bridge.mcore_launcher import run_mcore_jobs
from megatron_bridge.verify import compare_logits, hf_logits, probe_tokens

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "megatron_core_019")
CKPT = os.path.join(FIXTURE, "checkpoint")
REFERENCE = os.path.join(FIXTURE, "reference.safetensors")
SHAPE = dict(layers=2, heads=4, groups=2, head_dim=8, vocab=200, padded_vocab=256)


@pytest.fixture
def marker(tmp_path):
    path = str(tmp_path / "PWNED")
    yield path
    assert not os.path.exists(path), "a hostile payload ran"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mc019") / "hf")
    what, _ = convert(CKPT, out, ConvertOptions(progress=False))
    assert what == "megatron torch_dist -> hf"
    return out


def test_new_layout_validates_and_its_common_state_reads():
    it_dir = torch_dist_format.iteration_dir(CKPT)
    assert "common.pt" not in os.listdir(it_dir)  # the 0.17+ layout, not a 0.16 checkpoint
    assert torch_dist_format.COMMON_STATE_KEY in torch_dist_format.read_dcp_metadata(CKPT).state_dict_metadata
    common = torch_dist_format.validate(CKPT)
    assert common == torch_dist_format.read_common(CKPT)
    assert (common["iteration"], common["checkpoint_version"]) == (3, 3.0)
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups, args.vocab_size,
            args.padded_vocab_size) == (2, 32, 4, 2, 200, 256)
    assert args.ckpt_format == "torch_dist" and args.tensor_model_parallel_size == 1
    info = inspect(CKPT)
    assert detect_format(CKPT) == info["format"] == "megatron_torch_dist"
    assert info["iteration"] == 3 and (info["tp"], info["pp"]) == (1, 1) and info["config"]["vocab_size"] == 200
    assert info["stored_elements"] == sum(t.numel() for t in load_file(REFERENCE).values())


def _hf_from_megatron(ref: dict, layers, heads, groups, head_dim, vocab, **_) -> dict:
    """Hugging Face tensors from megatron-core's, re-packed here from the format facts (DESIGN.md section 2):
    linear_qkv is [q of the group's heads, k, v] per KV group; linear_fc1 is [gate; up]; the vocab is padded."""
    per = heads // groups
    out = {"model.embed_tokens.weight": ref["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": ref["decoder.final_layernorm.weight"]}
    for i in range(layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = ref[f"{m}self_attention.linear_qkv.{kind}"]
            rest = tuple(qkv.shape[1:])
            g = qkv.reshape(groups, per + 2, head_dim, *rest)
            out[f"{h}self_attn.q_proj.{kind}"] = g[:, :per].reshape(heads * head_dim, *rest)
            out[f"{h}self_attn.k_proj.{kind}"] = g[:, per].reshape(groups * head_dim, *rest)
            out[f"{h}self_attn.v_proj.{kind}"] = g[:, per + 1].reshape(groups * head_dim, *rest)
        out[f"{h}self_attn.o_proj.weight"] = ref[f"{m}self_attention.linear_proj.weight"]
        gate, up = ref[f"{m}mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = gate, up
        out[f"{h}mlp.down_proj.weight"] = ref[f"{m}mlp.linear_fc2.weight"]
        out[f"{h}input_layernorm.weight"] = ref[f"{m}input_layernorm.weight"]
        out[f"{h}post_attention_layernorm.weight"] = ref[f"{m}pre_mlp_layernorm.weight"]
    return out


def test_converts_to_hf_bit_exact_against_what_0_19_saved(hf):
    want = _hf_from_megatron(load_file(REFERENCE), **SHAPE)
    got = load_file(os.path.join(hf, "model.safetensors"))
    # Llama's attention_bias also adds an o_proj bias, which megatron-core had none of: it must be zero.
    extra = {k for k in set(got) - set(want) if k.endswith("self_attn.o_proj.bias")}
    assert all(not got[k].any() for k in extra)
    assert set(got) - extra == set(want)
    unequal = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not unequal, unequal


def test_megatron_core_loads_it_resharded_with_the_converted_models_logits(hf):
    """One torchrun: real megatron-core (the installed 0.16) loads the 0.19 checkpoint (saved at TP=1 PP=1) at
    TP=2 and at PP=2, resharding at load, and gives the logits of the converted Hugging Face model."""
    tokens = probe_tokens(SHAPE["vocab"], batch=2, seq_len=16, seed=5)
    ref = hf_logits(hf, tokens)
    jobs = [{"checkpoint": CKPT, "task": "logits", "tokens": tokens.tolist(), "tp": tp, "pp": pp}
            for tp, pp in ((2, 1), (1, 2))]
    for res in run_mcore_jobs(jobs, nproc=2):
        rep = compare_logits(ref, res["logits"], 1e-4)
        assert rep.ok and rep.argmax_agree == rep.positions, rep


# --------------------------------------------------------------------------------------------------------------
# Hostile and malformed common_state objects: refused by name, nothing written, no payload runs.

def _copy(tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(CKPT, dst)
    return dst


def _rewrite_common_entry(root: str, payload: bytes = None, length: int = None, drop: bool = False) -> str:
    """Point the index's common_state entry at `payload` appended to its .distcp file (or at `length` bytes from
    its own offset, or drop it); returns the .distcp path."""
    it = torch_dist_format.iteration_dir(root)
    md = torch_dist_format.read_dcp_metadata(root)
    index = next(i for i in md.storage_data if i.fqn == torch_dist_format.COMMON_STATE_KEY)
    info = md.storage_data[index]
    path = os.path.join(it, info.relative_path)
    offset = info.offset
    if payload is not None:
        offset = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(payload)
        length = len(payload)
    if drop:
        del md.storage_data[index]
        del md.state_dict_metadata[torch_dist_format.COMMON_STATE_KEY]
    else:
        md.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset,
                                            length=length if length is not None else info.length,
                                            transform_descriptors=None)
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return path


def _refused(root: str, tmp_path, *expect: str) -> None:
    """validate, inspect and convert all refuse naming every `expect`; nothing is written."""
    for call in (lambda: torch_dist_format.validate(root), lambda: torch_dist_format.read_common(root),
                 lambda: inspect(root)):
        with pytest.raises(CheckpointError) as info:
            call()
        assert all(e in str(info.value) for e in expect), str(info.value)
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError):
        convert(root, dst, ConvertOptions(progress=False))
    assert not os.path.exists(dst)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_common_state_refused(kind, tmp_path, marker):
    build, expect, fixable = HOSTILE[kind]
    root = _copy(tmp_path)
    path = _rewrite_common_entry(root, _zip_bytes(build(marker)))
    _refused(root, tmp_path, expect, os.path.basename(path), "common_state")
    if fixable:
        with pytest.raises(CheckpointError, match="pass --allow-global MODULE.NAME if you trust it"):
            torch_dist_format.read_common(root)


@pytest.mark.parametrize("kind", list(MALFORMED_PICKLES))
def test_malformed_common_state_refused(kind, tmp_path, marker):
    build, expect = MALFORMED_PICKLES[kind]
    if kind.startswith("persistent id"):
        expect = "persistent id other than torch's"
    root = _copy(tmp_path)
    path = _rewrite_common_entry(root, _zip_bytes(build(marker)))
    _refused(root, tmp_path, expect, os.path.basename(path), "common_state")


def test_broken_common_state_entries_refused(tmp_path, marker):
    """A raw (pre-zip) hostile pickle, a byte range past the end of the file, an honest torch file that is not
    megatron-core's [dict], and an index with no common state at all (and no common.pt)."""
    import io

    buf = io.BytesIO()
    torch.save({"args": None}, buf)  # a dict, not the one-element list megatron-core saves
    cases = [
        (dict(payload=HOSTILE["STACK_GLOBAL os.system"][0](marker)), ("not a torch checkpoint", "common_state")),
        (dict(length=10 ** 7), ("truncated", "common_state")),
        (dict(payload=buf.getvalue()), ("not the [common state dict]", "common_state")),
        (dict(drop=True), ("neither common.pt", "no", "common_state")),
    ]
    for i, (how, expect) in enumerate(cases):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        root = _copy(sub)
        _rewrite_common_entry(root, **how)
        _refused(root, sub, *expect)


def test_cli_refuses_hostile_common_state_in_one_line(tmp_path, marker):
    root = _copy(tmp_path)
    path = _rewrite_common_entry(root, _zip_bytes(HOSTILE["GLOBAL builtins.open + REDUCE"][0](marker)))
    proc = subprocess.run([sys.executable, "-m", "launch", "inspect", root], cwd=ROOT, capture_output=True,
                          text=True, env=cli_env(OMP_NUM_THREADS="1"), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "builtins.open" in errors[0] and os.path.basename(path) in errors[0] and "common_state" in errors[0]
