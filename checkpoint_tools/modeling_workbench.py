"""The workbench model: the canonical decoder as a `transformers` model, plus what `modeling_llama.py` lacks.

    WorkbenchModel / WorkbenchForCausalLM / WorkbenchForSequenceClassification   registered with the Auto classes
        on import (model_type "workbench"); the whole canonical form: q/k/v and o bias, per-head q/k norm (Qwen3),
        tied embeddings, explicit head_dim, rope theta and scaling through transformers' own ROPE_INIT_FUNCTIONS
    from_pretrained(path, skip_build=True)   build on the meta device, assign the safetensors weights: no random
        initialisation at all
    stream_generate(prompt or messages)      text pieces as `generate()` produces tokens (chat template applied)
    attention       flash attention on GPU when installed, SDPA otherwise, eager as the fallback; "auto" unless
        `attn_implementation=` or `config.attention_backend` says otherwise; the choice is config._attn_implementation
    set_device(devices)   layers in balanced contiguous blocks over devices, activations moved in `forward`
    reward head     WorkbenchForSequenceClassification scores the last attended token (left or right padding);
        `pairwise_reward_loss` is TRL's -logsigmoid(chosen - rejected)
    show_cos_distance / show_topk_token / show_attention   the model explains itself, through forward hooks
    save_pretrained(dir, remote_code=True)   also writes these two files and `auto_map` (trust_remote_code=True)

Sequence parallelism (Ulysses) lives in checkpoint_tools/sequence_parallel.py, which registers its attention
function; this file imports only torch and transformers so it can travel inside a checkpoint folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import threading
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          GenerationMixin, PreTrainedModel)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_workbench import WorkbenchConfig

# ----------------------------------------------------------------------------------------------------------------
# Building blocks (numerically the same operations, in the same order, as transformers' Llama and Qwen3)
# ----------------------------------------------------------------------------------------------------------------


class WorkbenchRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class WorkbenchRotaryEmbedding(nn.Module):
    """cos/sin tables; rope scalings (Llama-3's included) come from transformers' own ROPE_INIT_FUNCTIONS."""

    def __init__(self, config: WorkbenchConfig, device=None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[
            self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs):
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                                   / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * n_rep, seq, dim] (grouped-query attention)."""
    b, kvh, s, d = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    return hidden_states[:, :, None, :, :].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain matmul-softmax attention: the fallback, and the one path that returns the weights."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class WorkbenchMLP(nn.Module):
    def __init__(self, config: WorkbenchConfig):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=bias)
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class WorkbenchAttention(nn.Module):
    """Grouped-query attention with optional q/k/v bias, o bias and per-head q/k RMSNorm (before rope, as Qwen3)."""

    def __init__(self, config: WorkbenchConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, q, kv = config.hidden_size, config.num_attention_heads * self.head_dim, config.num_key_value_heads * \
            self.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = WorkbenchRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = WorkbenchRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values: Optional[Cache] = None,
                **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class WorkbenchDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: WorkbenchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = WorkbenchAttention(config, layer_idx)
        self.mlp = WorkbenchMLP(config)
        self.input_layernorm = WorkbenchRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = WorkbenchRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                          past_key_values=past_key_values, position_ids=position_ids, **kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Attention choice and device placement
# ----------------------------------------------------------------------------------------------------------------


def fastest_attention() -> str:
    """flash_attention_2 when the package is installed and a GPU is there, else SDPA (transformers falls back to
    eager when SDPA cannot run)."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _to(x, device):
    """Move a tensor, or the tensors in a tuple/dict (position embeddings, mask mappings), to `device`."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(t, device) for t in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def balanced_blocks(num_layers: int, num_devices: int) -> list[int]:
    """Device index of each layer: contiguous blocks whose sizes differ by at most one (earlier blocks larger)."""
    sizes = [num_layers // num_devices + (i < num_layers % num_devices) for i in range(num_devices)]
    return [d for d, n in enumerate(sizes) for _ in range(n)]


def check_device_list(device_list: Sequence) -> list[torch.device]:
    """Devices as torch.device, refusing an empty list, duplicates and devices this machine does not have."""
    if device_list is None or len(device_list) == 0:
        raise ValueError("set_device needs at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu']")
    devices = []
    for d in device_list:
        try:
            dev = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"set_device: {d!r} is not a device name ({e})") from None
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (dev.index or 0) >= count:
                raise ValueError(f"set_device: {d!r} is not available (this machine has {count} CUDA device(s))")
        elif dev.type == "meta":
            raise ValueError("set_device: 'meta' holds no data; give real devices")
        elif dev.type != "cpu":
            backend = getattr(torch, dev.type, None)  # torch.xpu, torch.mps, ...
            if backend is None or not getattr(backend, "is_available", lambda: False)():
                raise ValueError(f"set_device: device type {dev.type!r} is not available here")
        devices.append(dev)
    seen = [str(d) for d in devices]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise ValueError(f"set_device: {dup} given more than once; each device holds one contiguous block of layers")
    return devices


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class WorkbenchPreTrainedModel(PreTrainedModel):
    config_class = WorkbenchConfig
    config: WorkbenchConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["WorkbenchDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def get_correct_attn_implementation(self, requested_attention: Optional[str], is_init_check: bool = False) -> str:
        # None means nobody asked: the config's attention_backend decides, and "auto" means the fastest available.
        if requested_attention is None:
            backend = getattr(self.config, "attention_backend", "auto")
            requested_attention = fastest_attention() if backend == "auto" else backend
            if requested_attention == "sdpa":
                return super().get_correct_attn_implementation(None, is_init_check)  # may fall back to eager
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, skip_build: bool = False, **kwargs):
        """`skip_build=True`: build on the meta device and assign the weights read from safetensors (local folders;
        keyword arguments dtype=, device=, attn_implementation=); otherwise transformers' own loader."""
        if not skip_build:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if args:
            raise ValueError("from_pretrained(skip_build=True) takes keyword arguments only (dtype=, device=)")
        return skip_build_load(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, **kwargs):
        """`remote_code=True` also copies this modeling code and writes `auto_map`, so `trust_remote_code=True`
        loads the folder without this project installed."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if remote_code:
            add_remote_code(save_directory)
        return out

    # ---- placement over devices ----
    def set_device(self, device_list: Sequence) -> "WorkbenchPreTrainedModel":
        """Place the decoder layers over `device_list` in balanced contiguous blocks, the embedding with the first
        device and the final norm and head(s) with the last; `forward` moves activations between them."""
        devices = check_device_list(device_list)
        base: WorkbenchModel = getattr(self, self.base_model_prefix, self)
        n = len(base.layers)
        if len(devices) > n:
            raise ValueError(f"set_device: {len(devices)} devices for {n} layers; give at most {n}")
        owner = balanced_blocks(n, len(devices))
        base.embed_tokens.to(devices[0])
        base.rotary_emb.to(devices[0])
        for layer, d in zip(base.layers, owner):
            layer.to(devices[d])
        base.norm.to(devices[-1])
        for name, child in self.named_children():
            if child is not base:
                child.to(devices[-1])  # lm_head / score
        if getattr(self.config, "tie_word_embeddings", False) and len(devices) > 1 and hasattr(self, "lm_head"):
            # a tied head on another device than the embedding can no longer share storage: keep them tied by value
            self.lm_head.weight = nn.Parameter(base.embed_tokens.weight.detach().to(devices[-1]),
                                               requires_grad=base.embed_tokens.weight.requires_grad)
        base.layer_devices = [devices[d] for d in owner]
        base.device_list = devices
        return self


class WorkbenchModel(WorkbenchPreTrainedModel):
    """The decoder stack: embedding, layers, final norm (hidden states out)."""

    def __init__(self, config: WorkbenchConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([WorkbenchDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = WorkbenchRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = WorkbenchRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.layer_devices: Optional[list[torch.device]] = None  # set by set_device
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        position_ids = position_ids.to(inputs_embeds.device)
        mask = attention_mask
        if not isinstance(mask, dict):
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                      attention_mask=_to(attention_mask, inputs_embeds.device),
                                      past_key_values=past_key_values, position_ids=position_ids)
        else:
            mask = mask["full_attention"]
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if self.layer_devices is not None and hidden_states.device != self.layer_devices[i]:
                dev = self.layer_devices[i]
                hidden_states, mask, position_ids = _to(hidden_states, dev), _to(mask, dev), _to(position_ids, dev)
                position_embeddings = _to(position_embeddings, dev)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
        hidden_states = self.norm(_to(hidden_states, self.norm.weight.device))
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class _Explain:
    """The model explains itself: forward hooks on one layer, nothing of the forward pass copied.

    Each helper takes the layer (negative counts from the end), the input (text, token ids, or a [1, seq] tensor)
    and an optional tokenizer (else `self.tokenizer` if set), returns the numbers and prints a table.
    """

    def _layer_index(self, layer: int) -> int:
        n = len(self.model.layers)
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer={layer!r} is out of range: this model has {n} layers (0..{n - 1}, or -{n}..-1)")
        return layer % n

    def _explain_ids(self, inputs, tokenizer) -> torch.Tensor:
        if isinstance(inputs, str):
            if tokenizer is None:
                raise ValueError("text input needs a tokenizer: pass tokenizer= or set model.tokenizer")
            inputs = tokenizer(inputs, return_tensors="pt")["input_ids"]
        ids = torch.as_tensor(inputs, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"explain one non-empty sequence at a time; got input of shape {tuple(ids.shape)}")
        return ids.to(self.model.embed_tokens.weight.device)

    @staticmethod
    def _token_index(name: str, index: int, seq_len: int) -> int:
        if not isinstance(index, int) or not -seq_len <= index < seq_len:
            raise ValueError(f"{name}={index!r} is past the sequence: it has {seq_len} tokens (0..{seq_len - 1})")
        return index % seq_len

    def _tokens(self, ids: torch.Tensor, tokenizer) -> list[str]:
        if tokenizer is None:
            return [str(int(t)) for t in ids[0]]
        return [repr(tokenizer.decode([int(t)])) for t in ids[0]]

    @contextlib.contextmanager
    def _hooked(self, module: nn.Module):
        """Capture (inputs, output) of `module` during one forward pass."""
        seen = {}

        def hook(mod, args, kwargs, output):
            seen["input"] = args[0] if args else kwargs.get("hidden_states")
            seen["output"] = output

        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @torch.no_grad()
    def show_cos_distance(self, layer: int, inputs, tokenizer=None) -> dict:
        """Cosine distance (1 - cos) between the layer's input and output hidden states: per token and averaged.

        Small distances mark layers that barely change the residual stream (candidates for pruning)."""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        i = self._layer_index(layer)
        ids = self._explain_ids(inputs, tokenizer)
        with self._hooked(self.model.layers[i]) as seen:
            self(input_ids=ids, use_cache=False)
        out = seen["output"][0] if isinstance(seen["output"], tuple) else seen["output"]
        dist = 1.0 - F.cosine_similarity(seen["input"][0].float(), out[0].float(), dim=-1)
        result = {"layer": i, "per_token": dist.cpu(), "mean": float(dist.mean())}
        rows = [(str(t), tok, f"{float(d):.6f}") for t, (tok, d) in enumerate(zip(self._tokens(ids, tokenizer),
                                                                                     dist))]
        _print_table(f"cosine distance, layer {i} input -> output (mean {result['mean']:.6f})",
                     ("pos", "token", "1 - cos"), rows)
        return result

    @torch.no_grad()
    def show_topk_token(self, layer: int, inputs, K: int = 10, tokenizer=None) -> list[dict]:
        """Logit lens: the next-token top K read from the layer's output through the final norm and the head.

        (`output_hidden_states[-1]` is already normed; reading the raw layer output with a hook and norming once is
        what makes the last layer agree with the model's own prediction.)"""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        i = self._layer_index(layer)
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K={K!r}: ask for at least one token")
        ids = self._explain_ids(inputs, tokenizer)
        with self._hooked(self.model.layers[i]) as seen:
            self(input_ids=ids, use_cache=False)
        out = seen["output"][0] if isinstance(seen["output"], tuple) else seen["output"]
        h = out[:, -1:].to(self.model.norm.weight.device)
        logits = self.lm_head(self.model.norm(h).to(self.lm_head.weight.device))[0, -1].float()
        probs = logits.softmax(-1)
        top = torch.topk(logits, min(K, logits.numel()))
        result = [{"rank": r + 1, "token_id": int(t), "token": tokenizer.decode([int(t)]) if tokenizer else None,
                   "logit": float(v), "prob": float(probs[t])} for r, (v, t) in enumerate(zip(top.values,
                                                                                            top.indices))]
        _print_table(f"logit lens, layer {i}: next-token top {len(result)}", ("rank", "id", "token", "logit", "prob"),
                     [(str(d["rank"]), str(d["token_id"]), repr(d["token"]), f"{d['logit']:.4f}",
                       f"{d['prob']:.4f}") for d in result])
        return result

    @torch.no_grad()
    def show_attention(self, layer: int, tokenA: int, tokenB: int, inputs, tokenizer=None) -> dict:
        """Attention weight from token A (query) to token B (key), per head and averaged; computed with eager
        attention for this call (the fused kernels never materialise the weights)."""
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        i = self._layer_index(layer)
        ids = self._explain_ids(inputs, tokenizer)
        a = self._token_index("tokenA", tokenA, ids.shape[1])
        b = self._token_index("tokenB", tokenB, ids.shape[1])
        before = self.config._attn_implementation
        self.config._attn_implementation = "eager"  # the mask is built for eager too, so causality holds
        try:
            with self._hooked(self.model.layers[i].self_attn) as seen:
                self(input_ids=ids, use_cache=False)
        finally:
            self.config._attn_implementation = before
        weights = seen["output"][1][0].float().cpu()  # [heads, query, key]
        per_head = weights[:, a, b]
        result = {"layer": i, "tokenA": a, "tokenB": b, "per_head": per_head, "mean": float(per_head.mean()),
                  "weights": weights}
        toks = self._tokens(ids, tokenizer)
        _print_table(f"attention, layer {i}: {toks[a]} (pos {a}) -> {toks[b]} (pos {b}), mean "
                     f"{result['mean']:.6f}", ("head", "weight"),
                     [(str(h), f"{float(w):.6f}") for h, w in enumerate(per_head)])
        return result


def _print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    print(title)
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


class _TokenQueue(BaseStreamer):
    """Receives the tokens `generate()` produces (the prompt first, then one step at a time) for stream_generate."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True  # generate() hands over the prompt first
            return
        self.queue.put(("tokens", value.reshape(-1).tolist()))

    def end(self):
        self.queue.put(("end", None))


class _StopWhenAbandoned(StoppingCriteria):
    """Ends generate() once the consumer of stream_generate stops iterating (a closed chat window)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class WorkbenchForCausalLM(_Explain, WorkbenchPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: WorkbenchConfig):
        super().__init__(config)
        self.model = WorkbenchModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tokenizer = None  # optional: used by stream_generate and the show_* helpers when set
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: Union[int, torch.Tensor] = 0,
                **kwargs) -> CausalLMOutputWithPast:
        first = self.model.embed_tokens.weight.device
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(logits.device),
                                      vocab_size=self.config.vocab_size, **kwargs)
        # generate() appends tokens to input_ids on the first device: hand the logits back there
        return CausalLMOutputWithPast(loss=loss, logits=_to(logits, first), past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)

    def stream_generate(self, prompt_or_messages, tokenizer=None, *, max_new_tokens: int = 128,
                        do_sample: bool = False, chat_template: bool = True, **generate_kwargs) -> Iterator[str]:
        """Yield text pieces while `generate()` produces tokens; their concatenation is the decoded generation.

        `prompt_or_messages`: a string (sent as one user turn when the tokenizer has a chat template and
        `chat_template` is true) or a list of {"role", "content"} messages. Greedy unless `do_sample=True`
        (temperature=, top_p=, top_k= pass through). Pieces are cut only at complete characters."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("stream_generate needs a tokenizer: pass tokenizer= or set model.tokenizer")
        input_ids = self.prompt_ids(prompt_or_messages, tokenizer, chat_template)
        streamer = _TokenQueue()
        abandoned = threading.Event()
        failure = []
        stopping = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_StopWhenAbandoned(abandoned))

        def run():
            try:
                self.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                              tokenizer.eos_token_id, stopping_criteria=stopping, **generate_kwargs)
            except BaseException as e:  # handed to the consumer, raised there
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        tokens: list[int] = []
        sent = ""
        try:
            while True:
                kind, value = streamer.queue.get()
                if kind == "end":
                    break
                tokens += value
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete multi-byte character: wait for the next token
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
        finally:  # also when the consumer stops early: generate() ends at its next step
            abandoned.set()
            worker.join()
        if failure:
            raise failure[0]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(sent):
            yield text[len(sent):]
        self.last_stream_tokens = tokens

    def prompt_ids(self, prompt_or_messages, tokenizer, chat_template: bool = True) -> torch.Tensor:
        """[1, seq] input ids for a prompt or a message list, through the chat template when there is one."""
        if isinstance(prompt_or_messages, str):
            if chat_template and getattr(tokenizer, "chat_template", None):
                prompt_or_messages = [{"role": "user", "content": prompt_or_messages}]
            else:
                return tokenizer(prompt_or_messages, return_tensors="pt")["input_ids"].to(self.device)
        if not isinstance(prompt_or_messages, (list, tuple)) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in prompt_or_messages):
            raise ValueError("stream_generate takes a string or a list of {'role': ..., 'content': ...} messages")
        enc = tokenizer.apply_chat_template(list(prompt_or_messages), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"].to(self.device)


def last_attended_index(attention_mask: Optional[torch.Tensor], batch: int, seq: int, device) -> torch.Tensor:
    """Per row, the position of the last token the mask attends (left and right padding alike); the last position
    when there is no mask. (A pad-token search fails when pad == eos and the text ends with eos.)"""
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(-1).to(device)


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None):
    """Bradley-Terry loss of a reward model, as TRL's RewardTrainer: mean of -logsigmoid(r_chosen - r_rejected)."""
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


class WorkbenchForSequenceClassification(WorkbenchPreTrainedModel):
    """A scalar (num_labels=1: reward model) or classification head on the last attended token.

    Position ids follow the attention mask, so a left-padded batch scores as the right-padded one."""

    def __init__(self, config: WorkbenchConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = WorkbenchModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs) -> SequenceClassifierOutputWithPast:
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = (attention_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state
        logits_all = self.score(hidden.to(self.score.weight.device))
        b, s = logits_all.shape[:2]
        idx = last_attended_index(attention_mask, b, s, logits_all.device)
        logits = logits_all[torch.arange(b, device=logits_all.device), idx]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                                hidden_states=outputs.hidden_states)

    def preference_loss(self, chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> torch.Tensor:
        """Pairwise loss of one preference batch (chosen and rejected scored in one forward pass when they pad
        to the same length)."""
        r_chosen = self(input_ids=chosen_ids, attention_mask=chosen_mask).logits[:, 0]
        r_rejected = self(input_ids=rejected_ids, attention_mask=rejected_mask).logits[:, 0]
        return pairwise_reward_loss(r_chosen, r_rejected)


# ----------------------------------------------------------------------------------------------------------------
# Loading without initialisation, and remote code
# ----------------------------------------------------------------------------------------------------------------


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json; skip_build reads safetensors "
                     f"checkpoints only (use from_pretrained without skip_build for other formats)")


def skip_build_load(cls, path: str, dtype=None, device="cpu", attn_implementation: Optional[str] = None,
                    config: Optional[WorkbenchConfig] = None, **config_overrides):
    """Build `cls` on the meta device (no memory, no random init), then assign the tensors read from safetensors.

    Non-persistent buffers (rope tables) are recomputed on `device`; tied heads are re-tied; a missing or
    unexpected tensor is refused by name."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise ValueError(f"{path}: skip_build loads local checkpoint folders; download it first")
    config = config or WorkbenchConfig.from_pretrained(path, **config_overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():  # no storage, and the init functions are no-ops
        model = cls(config)
    state = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                state[name] = t.to(dtype) if dtype not in (None, "auto") and t.is_floating_point() else t
    expected = set(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match {cls.__name__}: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    base = model.model
    base.rotary_emb = WorkbenchRotaryEmbedding(config, device=device).to(device)
    if dtype in (None, "auto"):
        config.dtype = base.embed_tokens.weight.dtype
    else:
        config.dtype = dtype
    model.eval()
    return model


REMOTE_CODE_FILES = ("configuration_workbench.py", "modeling_workbench.py")
AUTO_MAP = {
    "AutoConfig": "configuration_workbench.WorkbenchConfig",
    "AutoModel": "modeling_workbench.WorkbenchModel",
    "AutoModelForCausalLM": "modeling_workbench.WorkbenchForCausalLM",
    "AutoModelForSequenceClassification": "modeling_workbench.WorkbenchForSequenceClassification",
}


def add_remote_code(folder: str) -> None:
    """Copy the two workbench files into a checkpoint folder and point `auto_map` at them (trust_remote_code)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["auto_map"] = dict(AUTO_MAP)
    tmp = cfg_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, cfg_path)


def _register() -> None:
    """Auto-class registration; a copy loaded as remote code finds "workbench" already taken and leaves it."""
    try:
        AutoConfig.register("workbench", WorkbenchConfig)
    except ValueError:
        return
    AutoModel.register(WorkbenchConfig, WorkbenchModel)
    AutoModelForCausalLM.register(WorkbenchConfig, WorkbenchForCausalLM)
    AutoModelForSequenceClassification.register(WorkbenchConfig, WorkbenchForSequenceClassification)


_register()

__all__ = ["WorkbenchConfig", "WorkbenchModel", "WorkbenchForCausalLM", "WorkbenchForSequenceClassification",
           "WorkbenchPreTrainedModel", "pairwise_reward_loss", "add_remote_code", "skip_build_load",
           "fastest_attention"]
