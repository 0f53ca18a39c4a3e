"""The canonical form every converter meets in the middle: a Llama-shaped decoder.

Tensor names are Hugging Face Llama's (``model.layers.{i}.self_attn.q_proj.weight`` ...), so the Llama family is
an identity table and every other family is a short rename/pack table. The config is a flat dataclass carrying
the options real families need; anything a family cannot express in it is refused by that family's table.

The decoder ends in one of two heads (`task`): the LM head (``lm_head.weight``, next-token logits), or a score head
(``score.weight`` [num_labels, hidden]) on the last attended token, which is how `transformers`' and TRL's reward
models (`*ForSequenceClassification`, num_labels=1) are stored; such a checkpoint has no LM head.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:  # torch is imported where a dtype is used: `inspect` reads checkpoints without it
    import torch

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
SCORE = "score.weight"
# What the final hidden states feed: next-token logits, or a score head (reward model / sequence classifier).
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "causal_lm", "sequence_classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)

# Per-layer canonical tensors; `{i}` is the global layer index. Optional ones exist only when the config says so.
LAYER_TENSORS = {
    "input_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "o_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "gate_bias": "model.layers.{i}.mlp.gate_proj.bias",
    "up_bias": "model.layers.{i}.mlp.up_proj.bias",
    "down_bias": "model.layers.{i}.mlp.down_proj.bias",
}
# Gated-MLP activations (Hugging Face ACT2FN names) the canonical decoder and Megatron both run: SwiGLU, and Gemma's
# tanh-approximated GeGLU.
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass
class CanonicalConfig:
    """Architecture of a Llama-shaped decoder plus the switches real families need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face's rope_scaling dict (rope_type "llama3", "linear", ...) or None.
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    dtype: str = "float32"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None  # a sequence classifier in transformers needs it to find each row's last token
    # The head: "causal_lm" (lm_head), or "sequence_classification" (score [num_labels, hidden], no lm_head).
    task: str = CAUSAL_LM
    num_labels: Optional[int] = None  # set exactly when task is sequence_classification
    # What the table does not model but must survive a round trip (e.g. the source config's own keys).
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: the canonical decoder's gated MLP supports "
                             f"{list(ACTIVATIONS)} only")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: the canonical decoder ends in one of {list(TASKS)}")
        if self.is_classifier != (isinstance(self.num_labels, int) and self.num_labels >= 1):
            raise ValueError(f"num_labels={self.num_labels!r} with task={self.task!r}: a sequence classifier needs "
                             f"num_labels >= 1, a causal LM none")

    @property
    def is_classifier(self) -> bool:
        """True when the model ends in a score head (reward model) instead of the LM head."""
        return self.task == SEQUENCE_CLASSIFICATION

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CanonicalConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown canonical config keys {sorted(unknown)}")
        return cls(**d)


def layer_tensor_names(cfg: CanonicalConfig, i: int) -> dict[str, str]:
    """Role -> canonical name of the tensors layer `i` has under `cfg` (optional roles filtered)."""
    roles = ["input_norm", "q", "k", "v", "o", "post_attn_norm", "gate", "up", "down"]
    if cfg.qkv_bias:
        roles += ["q_bias", "k_bias", "v_bias"]
    if cfg.o_bias:
        roles += ["o_bias"]
    if cfg.mlp_bias:
        roles += ["gate_bias", "up_bias", "down_bias"]
    if cfg.qk_norm:
        roles += ["q_norm", "k_norm"]
    return {r: LAYER_TENSORS[r].format(i=i) for r in roles}


def expected_tensor_names(cfg: CanonicalConfig) -> list[str]:
    """Every canonical tensor `cfg` implies, in a stable write order (embedding, layers, norm, head)."""
    names = [EMBED]
    for i in range(cfg.num_layers):
        names += list(layer_tensor_names(cfg, i).values())
    names.append(FINAL_NORM)
    if cfg.is_classifier:
        names.append(SCORE)
    elif not cfg.tie_word_embeddings:
        names.append(LM_HEAD)
    return names


def expected_shapes(cfg: CanonicalConfig) -> dict[str, tuple[int, ...]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, f = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    by_role = {
        "input_norm": (h,), "post_attn_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
        "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "o_bias": (h,), "q_norm": (hd,), "k_norm": (hd,),
        "gate": (f, h), "up": (f, h), "down": (h, f), "gate_bias": (f,), "up_bias": (f,), "down_bias": (h,),
    }
    shapes = {EMBED: (cfg.vocab_size, h), FINAL_NORM: (h,), LM_HEAD: (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        for role, name in layer_tensor_names(cfg, i).items():
            shapes[name] = by_role[role]
    if cfg.tie_word_embeddings or cfg.is_classifier:
        del shapes[LM_HEAD]
    if cfg.is_classifier:
        shapes[SCORE] = (cfg.num_labels, h)
    return shapes


class TensorSource(abc.ABC):
    """A lazily read set of canonical tensors: what every reader returns and every writer consumes.

    `get` returns a tensor the caller must not modify in place (it may be a view of a memory-mapped file).
    `release` lets the source drop cached pages once a caller has finished a unit of work.
    """

    config: CanonicalConfig

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Canonical tensor names, in write order."""

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name` (canonical naming)."""

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype `get(name)` will have (sources override this to answer without reading data)."""
        return self.get(name).dtype

    def get_parts(self, name: str) -> list[torch.Tensor]:
        """`get(name)` as contiguous row blocks whose concatenation along dim 0 is the tensor. A source that
        holds a tensor in pieces (Megatron's TP shards) hands them out as they are, so a writer can stream them
        without building the tensor; the default is the tensor itself."""
        return [self.get(name)]

    def get_column_parts(self, name: str) -> Optional[list[torch.Tensor]]:
        """`get(name)` as column blocks whose concatenation along dim 1 is the tensor, when the source holds it so
        (a row-parallel weight's TP shards), else None."""
        return None

    def release(self) -> None:
        """Drop any memory the source holds for tensors already handed out."""

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names():
            yield n, self.get(n)


def check_tensor_set(cfg: CanonicalConfig, names: list[str], shapes: dict[str, tuple] | None = None) -> None:
    """Fail with the full lists when the tensors do not match what the config implies (never drop silently)."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in set(names)]
    unknown = [n for n in names if n not in want]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:20]}")
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): {unknown[:20]}")
    if shapes:
        bad = [f"{n}: {tuple(shapes[n])} != {want[n]}" for n in names if n in want and tuple(shapes[n]) != want[n]]
        if bad:
            problems.append(f"shape mismatches ({len(bad)}): {bad[:20]}")
    if problems:
        raise ValueError("checkpoint does not match its config: " + "; ".join(problems))


class CastSource(TensorSource):
    """A source whose floating-point tensors are cast to `dtype` on the way through (the `--dtype` option)."""

    def __init__(self, inner: TensorSource, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype
        self.config = CanonicalConfig.from_dict({**inner.config.to_dict(), "dtype": str(dtype).split(".")[-1]})

    def names(self):
        return self.inner.names()

    def get(self, name):
        t = self.inner.get(name)
        return t.to(self.dtype) if t.is_floating_point() else t

    def get_parts(self, name):
        return [t.to(self.dtype) if t.is_floating_point() else t for t in self.inner.get_parts(name)]

    def get_column_parts(self, name):
        parts = self.inner.get_column_parts(name)
        return None if parts is None else [t.to(self.dtype) if t.is_floating_point() else t for t in parts]

    def dtype_of(self, name):
        return self.dtype

    def release(self):
        self.inner.release()
