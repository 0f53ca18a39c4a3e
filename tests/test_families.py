"""Every family to and from Llama and Megatron, proven with numbers.

For each family a random tiny model (2 layers, fp32) is made: by its own `transformers` class where one exists, else
as random tensors in the family's own names and packed layouts (InternLM2's group-interleaved wqkv, Baichuan2's
W_pack and NormHead, Yi's ln1/ln2), whose logits come from tests/_remote_code_reference.py: a forward pass written
from the family's published modeling code, not from our tables. Then:
  - converted to Llama, `LlamaForCausalLM` gives the original model's logits (1e-4);
  - converted to Megatron at TP=2, real megatron-core gives them too (all families in ONE torchrun launch);
  - back to the family, from Megatron and from Llama, every tensor is bit-exact, or equals exactly what the
    documented folding makes of it (Gemma's 1 + w norms, Granite's multipliers, Baichuan2's normalized head).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from _remote_code_reference import internlm2_qkv, reference_logits, write_checkpoint
from conftest import ROOT, assert_no_unexpected_warnings, cli_env
from checkpoint_tools.family_convert import convert_family
from checkpoint_tools.hf_checkpoint import HFSource
from checkpoint_tools.safetensors_io import SafetensorsDir
from megatron_bridge.convert import ConvertOptions, convert, hf_to_megatron, megatron_to_hf
from megatron_bridge.verify import compare_hf_dirs, compare_logits, probe_tokens, run_mcore_jobs

TOL = 1e-4
V = 128
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Families with a transformers class: config class and overrides that exercise what is special about each.
WITH_CLASS = {
    "llama": ("LlamaConfig", dict(rope_scaling=LLAMA31_ROPE, rope_theta=500000.0, max_position_embeddings=16384)),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", dict(hidden_size=72, head_dim=16)),  # sqrt(72): an embedding scale that rounds
    "granite": ("GraniteConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                      embedding_multiplier=12.0, attention_multiplier=0.0078125,
                                      residual_multiplier=0.22, logits_scaling=8.0)),
    "internlm3": ("InternLM3Config", dict(head_dim=24)),  # transformers runs it as LlamaForCausalLM
}
# Families without one: random checkpoints in their own layout (tests/_remote_code_reference.py), of this shape.
# InternLM2's published config has `bias: true` (wqkv and wo; the MLP has none); Baichuan2-7B has no GQA, no bias.
WITHOUT_CLASS = {fam: dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2) for fam in ("internlm2", "baichuan", "Yi")}
FAMILIES = [*WITH_CLASS, *WITHOUT_CLASS]


def _randomize(model, zero_centered_norms=False):
    """Non-trivial norms and biases, so a swapped or dropped tensor changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if zero_centered_norms else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def _tokenizer_asset(path):
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 256}\n')


def make_with_class(path, name, seed=0):
    cfg_cls, overrides = WITH_CLASS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **overrides})
    model = _randomize(transformers.AutoModelForCausalLM.from_config(cfg), zero_centered_norms=name == "gemma")
    model.save_pretrained(path)
    _tokenizer_asset(path)
    return model


def _llama(overrides, seed):
    torch.manual_seed(seed)
    return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})))


def make_without_class(path, name, seed=0, normalized_head=False):
    """A random remote-code checkpoint in the family's own layout (see tests/_remote_code_reference.py)."""
    return write_checkpoint(path, name, seed=seed, normalized_head=normalized_head, **WITHOUT_CLASS[name])


def documented_fold(family, name, t, hf_cfg):
    """What a round trip must give back for tensor `name`: itself, or what the documented folding makes of it."""
    if family == "gemma" and name.endswith("norm.weight"):
        return (t + 1.0) - 1.0  # (1 + w) is stored, w = (1 + w) - 1 comes back
    if family == "granite":
        hd = hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        if ".q_proj." in name:
            f = hf_cfg["attention_multiplier"] / hd ** -0.5
            return (t * f) / f
        if ".o_proj." in name or ".down_proj." in name:
            r = hf_cfg["residual_multiplier"]
            return (t * r) / r
    if family == "baichuan" and name == "lm_head.weight":
        return F.normalize(t.double(), dim=-1).float()  # NormHead: Llama and Megatron hold the normalized head
    return t


def assert_back(family, original, back):
    """Config equal, same tensor names, each tensor bit-exact or exactly its documented fold; returns #folded."""
    rt = compare_hf_dirs(original, back)
    assert not rt.missing and not rt.extra, (rt.missing, rt.extra)
    assert rt.assets_equal == rt.assets_total >= 1
    a, b = SafetensorsDir(original), SafetensorsDir(back)
    hf_cfg = json.load(open(os.path.join(original, "config.json")))
    folded = 0
    for name in a.names():
        want = documented_fold(family, name, a.get(name), hf_cfg)
        assert torch.equal(b.get(name), want), f"{family}: {name} differs beyond the documented folding"
        folded += not torch.equal(want, a.get(name))
    return rt, folded


def llama_logits(path, tokens):
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Every family: source, reference logits, Llama conversion and its logits, Megatron TP=2 and its logits."""
    root = tmp_path_factory.mktemp("families")
    tokens = probe_tokens(V, batch=2, seq_len=32, seed=1)
    out, jobs = {}, []
    for i, fam in enumerate(FAMILIES):
        src = str(root / fam / "hf")
        if fam in WITH_CLASS:
            model = make_with_class(src, fam, seed=i)
            with torch.no_grad():
                ref = model(tokens).logits
        else:  # the family's published forward pass, written independently of our tables
            ref = reference_logits(make_without_class(src, fam, seed=i), tokens)
        r = out[fam] = {"src": src, "ref": ref, "llama": str(root / fam / "llama"), "mg": str(root / fam / "mg")}
        if fam == "qwen3":  # LlamaForCausalLM has no q/k norm: refused (tested below)
            r["llama"] = None
        else:
            convert_family(src, r["llama"], "llama", progress=False)
            r["llama_logits"] = llama_logits(r["llama"], tokens)
        hf_to_megatron(src, r["mg"], ConvertOptions(tp=2, pp=1, progress=False))
        jobs.append({"checkpoint": r["mg"], "task": "logits", "tokens": tokens.tolist(), "vocab_size": V})
    for fam, res in zip(FAMILIES, run_mcore_jobs(jobs, nproc=2, timeout=900)):
        out[fam]["mcore"] = res["logits"]
    out["_tokens"], out["_root"] = tokens, root
    return out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])
def test_to_llama_gives_the_original_logits(zoo, family):
    r = zoo[family]
    rep = compare_logits(r["ref"], r["llama_logits"], TOL)
    print(f"\n{family} -> llama: max abs logits diff {rep.max_abs:.2e}")
    assert rep.max_abs <= TOL and rep.argmax_agree == rep.positions
    assert json.load(open(os.path.join(r["llama"], "config.json")))["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_tp2_gives_the_original_logits(zoo, family):
    r = zoo[family]
    rep = compare_logits(r["ref"], r["mcore"], TOL)
    print(f"\n{family} -> megatron TP=2: max abs logits diff {rep.max_abs:.2e}")
    assert rep.max_abs <= TOL and rep.argmax_agree == rep.positions


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_back_to_family(zoo, family, tmp_path):
    """Megatron -> the family: config identical; tensors bit-exact up to the documented folding."""
    back = str(tmp_path / "back")
    megatron_to_hf(zoo[family]["mg"], back, ConvertOptions(progress=False))
    rt, folded = assert_back(family, zoo[family]["src"], back)
    assert rt.config_equal, rt.config_diff
    assert (folded > 0) == (family in ("gemma", "granite", "baichuan")), folded


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3", "granite")])
def test_llama_back_to_family(zoo, family, tmp_path):
    """Llama -> the family: every tensor bit-exact up to the documented folding (Qwen2's zero o bias dropped)."""
    back = str(tmp_path / "back")
    convert_family(zoo[family]["llama"], back, family, progress=False)
    assert_back(family, zoo[family]["src"], back)


def test_granite_via_llama_keeps_the_function_not_the_multipliers(zoo, tmp_path):
    """A Llama config cannot hold Granite's multipliers: back from Llama they are the identity, same logits."""
    back = str(tmp_path / "back")
    convert_family(zoo["granite"]["llama"], back, "granite", progress=False)
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["logits_scaling"]) == (1.0, 1.0, 1.0)
    assert cfg["attention_multiplier"] == 16 ** -0.5
    with torch.no_grad():
        got = transformers.GraniteForCausalLM.from_pretrained(back).eval()(zoo["_tokens"]).logits
    assert compare_logits(zoo["granite"]["ref"], got).max_abs <= TOL


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma", "granite", "internlm3"])
def test_llama_to_a_new_family_runs_in_its_class(zoo, family, tmp_path):
    """Llama 3.1 (rope scaling, GQA, no bias) -> a family it never was: the family's own class gives Llama's logits
    (Qwen2 with zero q/k/v biases, Gemma with w - 1 norms and an unscaled embedding, Granite with identity
    multipliers)."""
    dst = str(tmp_path / family)
    convert_family(zoo["llama"]["src"], dst, family, progress=False)
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()(zoo["_tokens"]).logits
    assert compare_logits(zoo["llama"]["ref"], got).max_abs <= TOL


@pytest.mark.parametrize("family", ["qwen2", "gemma", "granite", "baichuan", "internlm2"])
def test_megatron_to_llama(zoo, family, tmp_path):
    """Megatron converts back to any family: here Llama, from checkpoints that came from other families."""
    dst = str(tmp_path / "llama")
    megatron_to_hf(zoo[family]["mg"], dst, ConvertOptions(progress=False), family="llama")
    assert compare_logits(zoo[family]["ref"], llama_logits(dst, zoo["_tokens"])).max_abs <= TOL


# ---- what is special about each family, against its own rule ----

def test_qwen2_to_llama_adds_a_zero_o_bias_and_back_drops_it(zoo):
    t = SafetensorsDir(zoo["qwen2"]["llama"])
    cfg = json.load(open(os.path.join(zoo["qwen2"]["llama"], "config.json")))
    assert cfg["attention_bias"] is True
    assert not torch.count_nonzero(t.get("model.layers.0.self_attn.o_proj.bias"))
    assert torch.count_nonzero(t.get("model.layers.0.self_attn.q_proj.bias"))


def test_internlm2_wqkv_follows_its_published_unpacking(zoo):
    """InternLM2Attention: rearrange(x @ wqkv.T, 'b q (h gs d) -> b q h gs d', gs=nq/nkv + 2); q = [..., :-2, :],
    k = [..., -2, :], v = [..., -1, :]. The canonical q/k/v must project exactly like that."""
    src = zoo["internlm2"]["src"]
    hf = SafetensorsDir(src)
    canon = HFSource(src)
    nq, nkv, hd = 4, 2, 16
    x = torch.randn(3, 5, 64)
    for i in range(2):
        qkv = x @ hf.get(f"model.layers.{i}.attention.wqkv.weight").T + hf.get(f"model.layers.{i}.attention.wqkv.bias")
        heads = internlm2_qkv(qkv, nq // nkv, hd)  # each [b, heads, s, d]
        for role, want in zip("qkv", heads):
            p = f"model.layers.{i}.self_attn.{role}_proj."
            got = x @ canon.get(p + "weight").T + canon.get(p + "bias")
            torch.testing.assert_close(got, want.transpose(1, 2).reshape(3, 5, -1), rtol=0, atol=1e-6)


def test_baichuan_w_pack_and_norm_head_follow_their_published_rules(zoo):
    """BaichuanAttention: proj.unflatten(-1, (3, hidden)) -> q, k, v; NormHead: F.normalize(lm_head.weight)."""
    src = zoo["baichuan"]["src"]
    hf, canon = SafetensorsDir(src), HFSource(src)
    w = hf.get("model.layers.1.self_attn.W_pack.weight")
    x = torch.randn(4, 64)
    q, k, v = (x @ w.T).unflatten(-1, (3, 64)).unbind(-2)
    for role, want in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(x @ canon.get(f"model.layers.1.self_attn.{role}_proj.weight").T, want)
    head = canon.get("lm_head.weight")
    assert torch.allclose(head, F.normalize(hf.get("lm_head.weight"), dim=-1), rtol=0, atol=1e-7)
    assert torch.allclose(head.double().norm(dim=-1), torch.ones(V, dtype=torch.float64), atol=1e-6)


def test_baichuan_with_a_normalized_head_round_trips_bit_exact(tmp_path):
    """As saved after inference (NormHead normalized the head in place): Llama and Megatron and back, bit-exact."""
    src = str(tmp_path / "hf")
    make_without_class(src, "baichuan", seed=7, normalized_head=True)
    for via in ("llama", "megatron"):
        mid, back = str(tmp_path / via), str(tmp_path / f"back_{via}")
        if via == "llama":
            convert_family(src, mid, "llama", progress=False)
            convert_family(mid, back, "baichuan", progress=False)
        else:
            hf_to_megatron(src, mid, ConvertOptions(tp=2, progress=False))
            megatron_to_hf(mid, back, ConvertOptions(progress=False))
        rt = compare_hf_dirs(src, back)
        assert rt.tensors_equal == rt.tensors_total > 0, (via, rt.mismatched)


def test_gemma_folds_norms_and_embedding_scale(zoo):
    """Gemma -> Llama: norms are 1 + w, the embedding is scaled by sqrt(hidden) (in the dtype), the head is the
    unscaled embedding, and the MLP keeps Gemma's tanh-GELU gate."""
    g, l = SafetensorsDir(zoo["gemma"]["src"]), SafetensorsDir(zoo["gemma"]["llama"])
    scale = torch.tensor(72 ** 0.5, dtype=torch.float32)
    e = g.get("model.embed_tokens.weight")
    assert torch.equal(l.get("model.embed_tokens.weight"), e * scale)
    assert torch.equal(l.get("lm_head.weight"), e)
    assert torch.equal(l.get("model.norm.weight"), g.get("model.norm.weight") + 1.0)
    cfg = json.load(open(os.path.join(zoo["gemma"]["llama"], "config.json")))
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["tie_word_embeddings"] is False


def test_config_tables_round_trip():
    """Each family's two-way config table: canonical -> HF config -> canonical is the identity."""
    from checkpoint_tools.canonical import CanonicalConfig
    from checkpoint_tools.families import FAMILIES as REGISTRY

    for fam in REGISTRY.values():
        cfg = CanonicalConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4,
                              num_key_value_heads=4 if fam.model_type == "baichuan" else 2, head_dim=16,
                              max_position_embeddings=256, **fam.constants)
        cfg = fam.widen(cfg)
        back = fam.config_to_canonical(fam.config_from_canonical(cfg), dtype="float32")
        assert back.to_dict() == {**cfg.to_dict(), "tie_word_embeddings": back.tie_word_embeddings}, fam.model_type


@pytest.mark.parametrize("nq,nkv", [(4, 1), (4, 2), (4, 4), (8, 2), (6, 3)])
def test_grouped_qkv_matches_the_published_rearrange(nq, nkv):
    """GroupedQKV reads a packed wqkv (weight rows, or bias) exactly as InternLM2Attention's rearrange does, and
    packs the same rows back bit for bit."""
    from checkpoint_tools.canonical import CanonicalConfig, LAYER_TENSORS as L
    from checkpoint_tools.families.mappings import Ctx, GroupedQKV

    hd, hidden = 4, 12
    cfg = CanonicalConfig(vocab_size=8, hidden_size=hidden, intermediate_size=8, num_layers=1, num_attention_heads=nq,
                          num_key_value_heads=nkv, head_dim=hd, qkv_bias=True)
    for parts, cols in (((L["q"], L["k"], L["v"]), hidden), ((L["q_bias"], L["k_bias"], L["v_bias"]), None)):
        (link,) = GroupedQKV("wqkv", parts).links(Ctx(cfg, {}))
        packed = torch.randn((nq + 2 * nkv) * hd, *(() if cols is None else (cols,)))
        # The published unpacking acts on the output features: run it on the rows as if they were outputs.
        rows_as_outputs = packed.reshape(packed.shape[0], -1).T[None]  # [1, cols, rows]
        want = [h[0].permute(0, 2, 1).reshape(-1, *packed.shape[1:])  # [heads, cols, d] -> [heads * d, cols]
                for h in internlm2_qkv(rows_as_outputs, nq // nkv, hd)]
        got = link.to_canonical([packed])
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(link.to_hf(want)[0], packed)


# ---- bad input: refused by name, nothing written ----

def _refused(src, to, match, tmp_path, **kw):
    dst = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        if to == "megatron":
            hf_to_megatron(src, dst, ConvertOptions(tp=kw.get("tp", 1), progress=False))
        else:
            convert_family(src, dst, to, progress=False)
    assert not os.path.exists(dst)


def test_qwen3_to_llama_is_refused_naming_qk_norm(zoo, tmp_path):
    _refused(zoo["qwen3"]["src"], "llama", r"q/k RMSNorm \(qk_norm", tmp_path)


def test_feature_a_target_lacks_is_refused_by_name(zoo, tmp_path):
    _refused(zoo["llama"]["src"], "qwen3", r"qwen3 .* cannot express per-head q/k RMSNorm", tmp_path)
    for fam in ("phi3", "internlm2", "Yi"):  # Llama 3.1's rope scaling: their code has no such scaling
        _refused(zoo["llama"]["src"], fam, r"cannot express rope scaling of type 'llama3'", tmp_path)
    _refused(zoo["qwen3"]["src"], "mistral", r"mistral .* cannot express per-head q/k RMSNorm \(qk_norm\)", tmp_path)
    _refused(zoo["qwen3"]["src"], "internlm2", r"cannot express an explicit head_dim", tmp_path)
    _refused(zoo["llama"]["src"], "baichuan", r"cannot express grouped-query attention", tmp_path)
    theta = _edit_config(zoo["baichuan"]["llama"], str(tmp_path / "theta"),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    _refused(theta, "baichuan", r"baichuan .* cannot express the rotary base \(rope_theta\)", tmp_path)
    _refused(zoo["granite"]["src"], "qwen2", r"mlp\.down_proj\.bias is nonzero, but qwen2 has no such bias", tmp_path)


def test_nonzero_o_bias_cannot_go_to_qwen2(tmp_path):
    model = _llama(dict(attention_bias=True), seed=3)
    src = str(tmp_path / "hf")
    model.save_pretrained(src)
    _refused(src, "qwen2", r"o_proj\.bias is nonzero, but qwen2 has no such bias", tmp_path)


def test_unnormalized_head_cannot_go_to_baichuan(tmp_path):
    src = str(tmp_path / "hf")
    _llama(dict(num_key_value_heads=4), seed=4).save_pretrained(src)
    _refused(src, "baichuan2", r"NormHead normalizes every lm_head row", tmp_path)


def _edit_config(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_source_features_canonical_cannot_hold_are_refused(zoo, tmp_path):
    cases = [
        ("baichuan", dict(max_position_embeddings=None), r"ALiBi"),  # the Baichuan2-13B layout
        ("mistral", dict(sliding_window=64), r"sliding-window attention \(sliding_window=64"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=64), r"sliding-window attention"),
        ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         r"partial rotary embedding \(partial_rotary_factor=0.5\)"),
        ("gemma", dict(use_bidirectional_attention=True), r"bidirectional attention"),
        ("qwen2", dict(attention_sink=True), r"qwen2 config has fields this converter does not know: "
                                             r"\['attention_sink'\]"),
    ]
    for i, (fam, changes, match) in enumerate(cases):
        src = _edit_config(zoo[fam]["src"], str(tmp_path / f"src{i}"), **changes)
        for to in ("llama", "megatron"):
            _refused(src, to, match, tmp_path)


def test_rope_megatron_cannot_run_is_refused_there_only(zoo, tmp_path):
    """InternLM3's dynamic-NTK rope: Llama runs it; megatron-core has no such scaling."""
    src = _edit_config(zoo["internlm3"]["src"], str(tmp_path / "src"),
                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    _refused(src, "megatron", r"rope_scaling type 'dynamic' has no megatron-core equivalent", tmp_path)
    convert_family(src, str(tmp_path / "llama"), "llama", progress=False)


def test_unknown_model_type_lists_the_supported(zoo, tmp_path):
    src = _edit_config(zoo["llama"]["src"], str(tmp_path / "src"), model_type="falcon")
    with pytest.raises(ValueError, match=r"unsupported model_type 'falcon'; supported: \[.*'qwen2'"):
        convert(src, str(tmp_path / "out"), ConvertOptions(progress=False), to="llama")
    with pytest.raises(ValueError, match=r"unsupported model_type 'falcon'; supported: \[.*'gemma'"):
        convert(zoo["llama"]["src"], str(tmp_path / "out"), ConvertOptions(progress=False), to="falcon")


# ---- the command line: make convert TO=..., python -m launch trans_X_to_Y ----

def test_make_convert_to_family_and_alias(zoo, tmp_path):
    env = cli_env()  # as a user runs it: no warning filters
    llama = str(tmp_path / "llama")
    r = subprocess.run(["make", "-s", "-C", ROOT, "convert", f"SRC={zoo['qwen2']['src']}", f"DST={llama}",
                        "TO=llama", "ARGS=--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"hf -> llama: wrote {llama}"), r.stdout
    assert_no_unexpected_warnings(r.stderr)
    back = str(tmp_path / "back")
    r = subprocess.run([sys.executable, "-m", "launch", "trans_llama_to_qwen", llama, back, "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_no_unexpected_warnings(r.stderr)
    assert_back("qwen2", zoo["qwen2"]["src"], back)


def test_alias_checks_its_source(zoo, tmp_path, capsys):
    from launch.cli import main
    assert main(["trans_gemma_to_llama", zoo["qwen2"]["src"], str(tmp_path / "x"), "--no-progress"]) == 2
    assert "is a qwen2 checkpoint, not gemma" in capsys.readouterr().err
    assert main(["trans_megatron_to_gemma", zoo["gemma"]["src"], str(tmp_path / "x")]) == 2
    assert main(["trans_falcon_to_llama", zoo["gemma"]["src"], str(tmp_path / "x")]) == 2
    assert "supported:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("family", ["gemma", "internlm2"])
def test_verify_command_covers_folding_and_classless_families(zoo, family):
    """`verify` holds Gemma's folded weights to the family's own trip through canonical (not to a bit-exact copy
    of the source, which folding cannot give), and checks InternLM2, which has no transformers class, against
    LlamaForCausalLM on its Llama conversion."""
    from megatron_bridge.verify import verify
    report = verify(zoo[family]["src"], zoo[family]["mg"], seq_len=16)
    assert report.ok, report.table()
    rt = report.round_trip
    assert rt.tensors_equal == rt.tensors_total > 0
    assert rt.reference == ("family round trip" if family == "gemma" else "source")
    assert ("LlamaForCausalLM" in report.reference_model) == (family == "internlm2")
    assert report.logits.max_abs <= 1e-4 and report.logits.argmax_agree == report.logits.positions
