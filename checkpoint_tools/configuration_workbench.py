"""`WorkbenchConfig`: the canonical decoder (checkpoint_tools/canonical.py) as a `transformers` config.

Every canonical option has a key here, so any family the converters read (Llama, Qwen2/3, Yi, Baichuan2, ...)
fits without approximation: q/k/v bias and o bias as two switches (Qwen2 has the first only), per-head q/k RMSNorm
(Qwen3), an explicit head_dim, tied embeddings, rope theta and scaling (Llama-3's included), the norm epsilon.
What the decoder cannot run (ALiBi, sliding windows, partial rotary) is refused by name at construction, so a
checkpoint that needs it never loads into a model that would silently compute something else.

This file imports only `transformers` (and the standard library): it is copied next to checkpoints for
`trust_remote_code=True`.
"""
from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig

# Attention kernels a user may ask for; "auto" picks flash attention on GPU when installed, else SDPA (eager is
# what transformers falls back to when SDPA cannot run).
ATTENTION_BACKENDS = ("auto", "flash_attention_2", "sdpa", "eager")


def _refuse_unexpressible(values: dict) -> None:
    """Raise naming the first feature the canonical decoder cannot run (values: the config's keys and kwargs)."""
    if values.get("alibi") or values.get("use_alibi") or values.get("position_embedding_type") == "alibi":
        raise ValueError("ALiBi position biases cannot be expressed by the workbench model (rotary only); load this "
                         "checkpoint with its own modeling code")
    window = values.get("sliding_window")
    if window is not None and values.get("use_sliding_window", True):
        raise ValueError(f"sliding-window attention (sliding_window={window}) cannot be expressed by the workbench "
                         f"model, which attends to every earlier token; set sliding_window=None if the window is "
                         f"never reached, or load the checkpoint with its own modeling code")
    other = sorted({t for t in values.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types {other} cannot be expressed by the workbench model (full attention only)")
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial rotary embedding (partial_rotary_factor={partial}) cannot be expressed by the "
                         f"workbench model, which rotates whole heads")


class WorkbenchConfig(PreTrainedConfig):
    """The canonical decoder's hyper-parameters under their Hugging Face names.

    `attention_bias` switches the q/k/v biases and `attention_out_bias` the o_proj bias (Llama ties the two,
    Qwen2 has only the first); `qk_norm` adds Qwen3's per-head RMSNorm on q and k before rope. `attention_backend`
    is the requested kernel ("auto" by default); the one in use is `config._attn_implementation` after loading.
    """

    model_type = "workbench"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_dropout: float | int = 0.0
    attention_backend: str = "auto"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        _refuse_unexpressible({**kwargs, "rope_parameters": self.rope_parameters})
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}; choose one of {list(ATTENTION_BACKENDS)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        super().__post_init__(**kwargs)
        _refuse_unexpressible({"rope_parameters": self.rope_parameters})


__all__ = ["WorkbenchConfig", "ATTENTION_BACKENDS"]
