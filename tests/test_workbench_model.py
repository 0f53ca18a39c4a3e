"""The workbench model (checkpoint_tools/modeling_workbench.py) against transformers' own classes, and its family.

- Every canonical option (biases, MLP bias, tied head, explicit head_dim, Llama-3 rope, eps, tanh-GELU):
  converted from a random `LlamaForCausalLM` through the workbench family, the logits are Llama's within 1e-5.
- Qwen3 (which Llama cannot hold) equals `Qwen3ForCausalLM`.
- Every family the project supports converts to workbench with the family's own logits, and back bit-exact (up
  to the documented folds).
- A config the model cannot run (ALiBi, sliding window, partial rotary) is refused by name.
- skip_build assigns exactly the checkpoint's tensors without running any init function; remote code loads.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import TINY
from test_families import (FAMILIES, V, WITH_CLASS, assert_back, make_with_class, make_without_class)
from _remote_code_reference import reference_logits
from checkpoint_tools.family_convert import convert_family
from checkpoint_tools.modeling_workbench import WorkbenchForCausalLM, fastest_attention

TOL = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
# One case per canonical option LlamaForCausalLM can hold (q/k norm is Qwen3's, tested below).
OPTIONS = {
    "plain": {},
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=24),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=256),
    "eps_theta": dict(rms_norm_eps=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 1234.0}),
    "gelu_tanh_mha": dict(hidden_act="gelu_pytorch_tanh", num_key_value_heads=4),
}


def randomize(model):
    """Non-trivial norms and biases so a dropped or swapped tensor changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tokens(batch=2, seq=40, vocab=TINY["vocab_size"], seed=7):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("option", list(OPTIONS))
def test_logits_equal_llama_for_each_canonical_option(option, tmp_path):
    torch.manual_seed(0)
    llama = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **OPTIONS[option]})))
    src, dst = str(tmp_path / "llama"), str(tmp_path / "wb")
    llama.save_pretrained(src)
    convert_family(src, dst, "workbench", progress=False)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["model_type"] == "workbench" and cfg["architectures"] == ["WorkbenchForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    assert isinstance(model, WorkbenchForCausalLM)
    ids = tokens()
    diff = (logits(model, ids) - logits(llama, ids)).abs().max().item()
    print(f"\n{option}: max abs logits diff vs LlamaForCausalLM {diff:.2e}")
    assert diff <= TOL
    # greedy generate() through the KV cache gives Llama's tokens
    prompt = ids[:1, :6]
    assert model.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == \
        llama.generate(prompt, max_new_tokens=8, do_sample=False).tolist()


def test_qwen3_equals_qwen3_for_causal_lm(tmp_path):
    torch.manual_seed(1)
    ref = randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**TINY, "head_dim": 24,
                                                                             "attention_bias": True})))
    src, dst = str(tmp_path / "qwen3"), str(tmp_path / "wb")
    ref.save_pretrained(src)
    convert_family(src, dst, "workbench", progress=False)
    assert json.load(open(os.path.join(dst, "config.json")))["qk_norm"] is True
    model = WorkbenchForCausalLM.from_pretrained(dst, dtype=torch.float32)
    ids = tokens()
    assert (logits(model, ids) - logits(ref, ids)).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def zoo_to_workbench(tmp_path_factory):
    """Every family: its own logits, and the same checkpoint converted to workbench."""
    root = tmp_path_factory.mktemp("wb_families")
    ids = tokens(vocab=V, seq=32, seed=1)
    out = {}
    for i, fam in enumerate(FAMILIES):
        src = str(root / fam / "hf")
        if fam in WITH_CLASS:
            ref = logits(make_with_class(src, fam, seed=i), ids)
        else:
            ref = reference_logits(make_without_class(src, fam, seed=i), ids)
        wb = str(root / fam / "wb")
        convert_family(src, wb, "workbench", progress=False)
        out[fam] = {"src": src, "wb": wb, "ref": ref}
    out["_ids"] = ids
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_to_workbench_and_back(zoo_to_workbench, family, tmp_path):
    r = zoo_to_workbench[family]
    got = logits(WorkbenchForCausalLM.from_pretrained(r["wb"], dtype=torch.float32), zoo_to_workbench["_ids"])
    diff = (got - r["ref"]).abs().max().item()
    print(f"\n{family} -> workbench: max abs logits diff {diff:.2e}")
    assert diff <= 1e-4  # the families' own forward passes round differently (as in test_families)
    if family == "granite":
        return  # its folded multipliers untie the head: back it is an untied Granite (as through Llama)
    back = str(tmp_path / "back")
    convert_family(r["wb"], back, family, progress=False)
    assert_back(family, r["src"], back)


def test_workbench_round_trip_is_identical(zoo_to_workbench, tmp_path):
    """workbench -> workbench keeps config and tensors as they are (the family table is the identity)."""
    from megatron_bridge.verify import compare_hf_dirs
    back = str(tmp_path / "again")
    convert_family(zoo_to_workbench["qwen3"]["wb"], back, "workbench", progress=False)
    rt = compare_hf_dirs(zoo_to_workbench["qwen3"]["wb"], back)
    assert rt.ok and rt.config_equal, (rt.mismatched, rt.config_diff)


def test_cli_trans_alias_writes_workbench(zoo_to_workbench, tmp_path):
    from launch.cli import main
    dst = str(tmp_path / "cli")
    assert main(["trans_qwen_to_workbench", zoo_to_workbench["qwen2"]["src"], dst]) == 0
    assert json.load(open(os.path.join(dst, "config.json")))["model_type"] == "workbench"


# ---- configs the model cannot run: refused by name ----

@pytest.mark.parametrize("extra,match", [
    (dict(alibi=True), r"ALiBi"),
    (dict(position_embedding_type="alibi"), r"ALiBi"),
    (dict(sliding_window=64), r"sliding-window attention \(sliding_window=64\)"),
    (dict(layer_types=["sliding_attention", "full_attention"]), r"layer_types \['sliding_attention'\]"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"partial rotary embedding \(partial_rotary_factor=0.5\)"),
    (dict(partial_rotary_factor=0.25), r"partial rotary embedding"),
    (dict(attention_backend="fastest"), r"attention_backend='fastest'"),
])
def test_unexpressible_config_is_refused_by_name(zoo_to_workbench, extra, match, tmp_path):
    dst = str(tmp_path / "edited")
    shutil.copytree(zoo_to_workbench["llama"]["wb"], dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    json.dump({**cfg, **extra}, open(os.path.join(dst, "config.json"), "w"))
    with pytest.raises(ValueError, match=match):
        WorkbenchForCausalLM.from_pretrained(dst)
    with pytest.raises(ValueError, match=match):
        WorkbenchForCausalLM.from_pretrained(dst, skip_build=True)


def test_attention_choice_is_automatic_overridable_and_visible(zoo_to_workbench):
    wb = zoo_to_workbench["llama"]["wb"]
    auto = WorkbenchForCausalLM.from_pretrained(wb)
    assert auto.config._attn_implementation == fastest_attention() == "sdpa"  # CPU: no flash attention
    eager = WorkbenchForCausalLM.from_pretrained(wb, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    by_config = WorkbenchForCausalLM.from_pretrained(wb, attention_backend="eager")
    assert by_config.config._attn_implementation == "eager"
    ids = zoo_to_workbench["_ids"]
    assert (logits(auto, ids) - logits(eager, ids)).abs().max().item() <= TOL


# ---- skip_build ----

def test_skip_build_assigns_the_checkpoint_without_init(zoo_to_workbench, monkeypatch):
    for fam in ("qwen2", "qwen3"):  # tied (qwen2's head) and q/k norm
        wb = zoo_to_workbench[fam]["wb"]
        stock = WorkbenchForCausalLM.from_pretrained(wb, dtype=torch.float32)

        def refuse(*a, **k):
            raise AssertionError("skip_build ran a weight initialisation")

        with monkeypatch.context() as m:
            for name in ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_", "trunc_normal_"):
                m.setattr(torch.nn.init, name, refuse)
                m.setattr(transformers.initialization, name, refuse, raising=False)
            fast = WorkbenchForCausalLM.from_pretrained(wb, skip_build=True)
        assert not any(p.is_meta for p in fast.parameters()) and not any(b.is_meta for b in fast.buffers())
        a, b = stock.state_dict(), fast.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ids = zoo_to_workbench["_ids"]
        assert torch.equal(logits(stock, ids), logits(fast, ids))
        if stock.config.tie_word_embeddings:
            assert fast.lm_head.weight is fast.model.embed_tokens.weight


def test_skip_build_refuses_a_tensor_set_that_does_not_match(zoo_to_workbench, tmp_path):
    from safetensors.torch import load_file, save_file
    dst = str(tmp_path / "broken")
    shutil.copytree(zoo_to_workbench["llama"]["wb"], dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected "
                                         r"\['model.layers.1.mlp.extra.weight'\]"):
        WorkbenchForCausalLM.from_pretrained(dst, skip_build=True)


def test_remote_code_folder_loads_without_the_project(zoo_to_workbench, tmp_path):
    """save_pretrained(remote_code=True): the folder carries its modeling code; trust_remote_code loads that code
    (a class from transformers' dynamic-module cache, not from this package) with the same logits."""
    model = WorkbenchForCausalLM.from_pretrained(zoo_to_workbench["qwen3"]["wb"], dtype=torch.float32)
    dst = str(tmp_path / "remote")
    model.save_pretrained(dst, remote_code=True)
    assert set(os.listdir(dst)) >= {"configuration_workbench.py", "modeling_workbench.py", "config.json"}
    for name in ("configuration_workbench.py", "modeling_workbench.py"):
        imports = [ln for ln in open(os.path.join(dst, name)) if ln.lstrip().startswith(("import ", "from "))]
        assert not [ln for ln in imports if "checkpoint_tools" in ln or "launch" in ln], imports
    # A fresh interpreter that never imports this project: "workbench" is known only through auto_map.
    script = ("import sys, torch, transformers; "
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, "
              "dtype=torch.float32); assert 'checkpoint_tools' not in sys.modules; "
              "torch.save({'module': type(m).__module__, 'logits': m(torch.load(sys.argv[2])).logits.detach()}, "
              "sys.argv[3])")
    ids = zoo_to_workbench["_ids"]
    torch.save(ids, str(tmp_path / "ids.pt"))
    subprocess.run([sys.executable, "-c", script, dst, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    out = torch.load(str(tmp_path / "out.pt"))
    assert out["module"].startswith("transformers_modules"), out["module"]
    assert torch.equal(out["logits"], logits(model, ids))


def test_megatron_to_workbench_and_back(zoo_to_workbench, tmp_path):
    """`make convert SRC=<megatron> TO=workbench`: a Megatron checkpoint of a Llama becomes workbench with the same
    logits, and a workbench checkpoint goes to Megatron TP=2 and comes back identical."""
    from megatron_bridge.convert import ConvertOptions, convert, hf_to_megatron, megatron_to_hf
    from megatron_bridge.verify import compare_hf_dirs
    mg = str(tmp_path / "mg")
    hf_to_megatron(zoo_to_workbench["llama"]["src"], mg, ConvertOptions(tp=2, pp=1, progress=False))
    wb = str(tmp_path / "wb_from_mg")
    convert(mg, wb, ConvertOptions(progress=False), to="workbench")
    got = logits(WorkbenchForCausalLM.from_pretrained(wb, dtype=torch.float32), zoo_to_workbench["_ids"])
    assert (got - zoo_to_workbench["llama"]["ref"]).abs().max().item() <= 1e-4
    mg_wb, back = str(tmp_path / "mg_wb"), str(tmp_path / "back")
    hf_to_megatron(zoo_to_workbench["qwen3"]["wb"], mg_wb, ConvertOptions(tp=2, pp=1, progress=False))
    megatron_to_hf(mg_wb, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(zoo_to_workbench["qwen3"]["wb"], back)
    assert rt.ok and rt.config_equal, (rt.mismatched, rt.config_diff)
