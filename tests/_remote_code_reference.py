"""Independent references for the remote-code families (InternLM2, Baichuan2-7B, Yi), which have no `transformers`
class to check a conversion against.

Written from the arithmetic of their published modeling files (modeling_internlm2.py, modeling_baichuan.py,
modeling_yi.py), never from checkpoint_tools' family tables: if a table misreads a family's packed layout, these
references disagree with it. Each family gets
  - `write_checkpoint`: a random checkpoint in the family's own tensor names and packed layouts, with a config shaped
    like the ones those repositories publish (transformers 4.x spellings: `rope_theta`, `torch_dtype`);
  - `reference_logits`: the family's forward pass, fp32, eager attention, no cache.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

FAMILIES = ("internlm2", "baichuan", "Yi")

# Each family's published config keys beyond the model shape (values as their model cards ship them, shrunk).
_PUBLISHED = {
    "internlm2": dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=True, rope_theta=1e6,
                      rope_scaling=None, attn_implementation="eager",
                      auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}),
    # Baichuan2-7B: no GQA key, no rope key (its RotaryEmbedding fixes base=10000), NormHead.
    "baichuan": dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", model_max_length=256,
                     z_loss_weight=0, tokenizer_class="BaichuanTokenizer",
                     auto_map={"AutoConfig": "configuration_baichuan.BaichuanConfig",
                               "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}),
    "Yi": dict(architectures=["YiForCausalLM"], model_type="Yi", rope_theta=5e6,
               auto_map={"AutoConfig": "configuration_yi.YiConfig",
                         "AutoModelForCausalLM": "modeling_yi.YiForCausalLM"}),
}


def published_config(family: str, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, **extra) -> dict:
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.02,
               tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0,
               use_cache=True, transformers_version="4.36.2")
    if family != "baichuan":  # Baichuan2-7B is multi-head attention: its config has no such key
        cfg["num_key_value_heads"] = num_key_value_heads
    return {**cfg, **_PUBLISHED[family], **extra}


def random_tensors(family: str, cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the family's own names and packed shapes (norms around 1, biases small, nonzero)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nq = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nq)
    hd = h // nq

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 0.5 + torch.rand(h, generator=g)

    out = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if family == "internlm2":
            out[p + "attention_norm.weight"] = norm()
            out[p + "attention.wqkv.weight"] = w((nq + 2 * nkv) * hd, h)
            out[p + "attention.wo.weight"] = w(h, nq * hd)
            if cfg.get("bias"):
                out[p + "attention.wqkv.bias"] = w((nq + 2 * nkv) * hd)
                out[p + "attention.wo.bias"] = w(h)
            out[p + "ffn_norm.weight"] = norm()
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = w(f, h), w(f, h)
            out[p + "feed_forward.w2.weight"] = w(h, f)
            continue
        if family == "baichuan":
            out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"] = norm(), norm()
            out[p + "self_attn.W_pack.weight"] = w(3 * h, h)
        else:  # Yi
            out[p + "ln1.weight"], out[p + "ln2.weight"] = norm(), norm()
            out[p + "self_attn.q_proj.weight"] = w(nq * hd, h)
            out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = w(nkv * hd, h), w(nkv * hd, h)
        out[p + "self_attn.o_proj.weight"] = w(h, nq * hd)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = w(f, h), w(f, h)
        out[p + "mlp.down_proj.weight"] = w(h, f)
    embed, head = ("model.tok_embeddings.weight", "output.weight") if family == "internlm2" else \
        ("model.embed_tokens.weight", "lm_head.weight")
    out[embed], out["model.norm.weight"], out[head] = w(v, h, std=1.0), norm(), w(v, h)
    return out


def write_checkpoint(path: str, family: str, seed: int = 0, normalized_head: bool = False, **shape) -> str:
    """A random `family` checkpoint at `path` (model.safetensors, config.json, a tokenizer asset).

    `normalized_head` (Baichuan2): the head as saved after inference, where NormHead normalized it in place.
    """
    cfg = published_config(family, **shape)
    tensors = random_tensors(family, cfg, seed)
    if normalized_head:
        tensors["lm_head.weight"] = F.normalize(tensors["lm_head.weight"])
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 256}\n')
    return path


# ---- the published forward passes ----

def _rms_norm(x, weight, eps):
    # InternLM2RMSNorm / Baichuan2's RMSNorm / YiRMSNorm: float32 variance, then weight * normalized
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, base):
    """The three files' RotaryEmbedding + apply_rotary_pos_emb on [b, heads, s, d], positions 0..s-1."""
    d, s = q.shape[-1], q.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.einsum("i,j->ij", torch.arange(s, dtype=inv_freq.dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def internlm2_qkv(qkv_states, num_key_value_groups, head_dim):
    """InternLM2Attention.forward on the wqkv output [b, s, (nkv * (groups + 2) * d)] -> q, k, v [b, heads, s, d]."""
    qkv_states = rearrange(qkv_states, "b q (h gs d) -> b q h gs d", gs=2 + num_key_value_groups, d=head_dim)
    query_states = qkv_states[..., :num_key_value_groups, :]
    query_states = rearrange(query_states, "b q h gs d -> b q (h gs) d")
    key_states = qkv_states[..., -2, :]
    value_states = qkv_states[..., -1, :]
    return query_states.transpose(1, 2), key_states.transpose(1, 2), value_states.transpose(1, 2)


def _attention(family, t, p, x, cfg):
    b, s, h = x.shape
    nq = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nq)
    hd = h // nq
    if family == "internlm2":
        qkv = F.linear(x, t[p + "attention.wqkv.weight"], t.get(p + "attention.wqkv.bias"))
        q, k, v = internlm2_qkv(qkv, nq // nkv, hd)
        base = cfg.get("rope_theta", 10000)
    elif family == "baichuan":
        # BaichuanAttention: W_pack output unflattened into (3, hidden): q, k, v
        proj = F.linear(x, t[p + "self_attn.W_pack.weight"])
        proj = proj.unflatten(-1, (3, h)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (proj[j].view(b, s, nq, hd).transpose(1, 2) for j in range(3))
        base = 10000  # RotaryEmbedding(self.head_dim, max_position_embeddings) with its default base
    else:  # YiAttention: separate projections, as Llama
        q = F.linear(x, t[p + "self_attn.q_proj.weight"]).view(b, s, nq, hd).transpose(1, 2)
        k = F.linear(x, t[p + "self_attn.k_proj.weight"]).view(b, s, nkv, hd).transpose(1, 2)
        v = F.linear(x, t[p + "self_attn.v_proj.weight"]).view(b, s, nkv, hd).transpose(1, 2)
        base = cfg.get("rope_theta", 10000)
    q, k = _rope(q, k, base)
    # repeat_kv (InternLM2) / repeat_interleave over heads (Yi): KV head j serves query heads j*g .. (j+1)*g - 1
    k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))
    scores = q @ k.transpose(2, 3) / math.sqrt(hd)
    scores = scores + torch.full((s, s), torch.finfo(scores.dtype).min).triu(1)
    out = F.softmax(scores, dim=-1, dtype=torch.float32) @ v
    out = out.transpose(1, 2).reshape(b, s, nq * hd)
    if family == "internlm2":
        return F.linear(out, t[p + "attention.wo.weight"], t.get(p + "attention.wo.bias"))
    return F.linear(out, t[p + "self_attn.o_proj.weight"])


def _mlp(family, t, p, x):
    if family == "internlm2":  # InternLM2MLP: w2(act(w1(x)) * w3(x))
        gate, up, down = (t[p + f"feed_forward.{n}.weight"] for n in ("w1", "w3", "w2"))
    else:
        gate, up, down = (t[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def reference_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """The logits the family's own code computes for the checkpoint at `path` (fp32, [b, s, vocab])."""
    cfg = json.load(open(os.path.join(path, "config.json")))
    family = cfg["model_type"]
    t = load_file(os.path.join(path, "model.safetensors"))
    eps = cfg["rms_norm_eps"]
    norms = ("attention_norm", "ffn_norm") if family == "internlm2" else \
        ("input_layernorm", "post_attention_layernorm") if family == "baichuan" else ("ln1", "ln2")
    with torch.no_grad():
        x = F.embedding(tokens, t["model.tok_embeddings.weight" if family == "internlm2" else
                                  "model.embed_tokens.weight"])
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = x + _attention(family, t, p, _rms_norm(x, t[p + norms[0] + ".weight"], eps), cfg)
            x = x + _mlp(family, t, p, _rms_norm(x, t[p + norms[1] + ".weight"], eps))
        x = _rms_norm(x, t["model.norm.weight"], eps)
        if family == "internlm2":
            head = t["output.weight"]
        elif family == "baichuan":
            head = F.normalize(t["lm_head.weight"])  # NormHead at inference
        else:
            head = t["lm_head.weight"]
        return F.linear(x, head).float()
