"""The config half of a family table: `(hf_key, canonical_key)` pairs, read and written by `Family`.

    ConfigField     one pair, with its default, value converters and other spellings
    fields_without  a copy of a table without some keys (families start from Llama's)
    rope_from_hf / rope_to_hf   the rotary keys every family spells the same way (transformers 4.x and 5.x)
    head_from_hf / labels_to_hf the head every family spells the same way: `architectures` (…ForCausalLM or
                    …ForSequenceClassification) and the label count transformers derives from `id2label`
    COMMON_KEYS, CARRY_KEYS, FEATURES   keys every family knows, keys carried across families, and the canonical
                    fields a target family must reproduce (with the words its refusal uses)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from checkpoint_tools.canonical import CAUSAL_LM, SEQUENCE_CLASSIFICATION, CanonicalConfig

_MISSING = object()

# Keys every family reads the same way (rope, dtype) or carries over untouched (bookkeeping, generation).
COMMON_KEYS = frozenset({
    "rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype", "architectures", "model_type",
    "transformers_version", "_name_or_path", "initializer_range", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "attention_dropout", "auto_map", "quantization_config", "_model_name_or_path",
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id", "num_labels",
})

# Bookkeeping keys worth keeping when a config moves to another family (they mean the same everywhere).
CARRY_KEYS = frozenset({
    "initializer_range", "use_cache", "attention_dropout", "output_hidden_states", "output_attentions",
    "return_dict", "id2label", "label2id", "problem_type", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id",
})

# Canonical fields a target family must reproduce exactly, with the words a refusal uses for them. Biases are
# handled tensor by tensor (zero-filled or proven zero); dtype, token ids and `extra` are not architecture.
FEATURES = {
    "vocab_size": "the vocabulary size", "hidden_size": "the hidden size",
    "intermediate_size": "the MLP width", "num_layers": "the layer count",
    "num_attention_heads": "the head count", "num_key_value_heads": "grouped-query attention (num_key_value_heads)",
    "head_dim": "an explicit head_dim (not hidden_size / num_attention_heads)",
    "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "the RMSNorm epsilon",
    "rope_theta": "the rotary base (rope_theta)", "rope_scaling": "rope scaling",
    "tie_word_embeddings": "tied input/output embeddings", "qk_norm": "per-head q/k RMSNorm (qk_norm)",
    "hidden_act": "the MLP activation (hidden_act)",
    "task": "a sequence-classification (reward) head", "num_labels": "the score head's label count (num_labels)",
}

CLASSIFIER_SUFFIX = "ForSequenceClassification"
# transformers' PreTrainedConfig: a config without id2label (nor num_labels) has two labels.
DEFAULT_NUM_LABELS = 2


def head_from_hf(hf: dict) -> tuple[str, Optional[int]]:
    """(task, num_labels): a `…ForSequenceClassification` architecture ends in a score head whose label count is
    `len(id2label)`, as transformers derives it (else `num_labels`, else 2)."""
    if not any(str(a).endswith(CLASSIFIER_SUFFIX) for a in hf.get("architectures") or []):
        return CAUSAL_LM, None
    labels = hf.get("id2label")
    return SEQUENCE_CLASSIFICATION, len(labels) if labels else int(hf.get("num_labels", DEFAULT_NUM_LABELS))


def labels_to_hf(cfg: CanonicalConfig, hf: dict) -> dict:
    """id2label/label2id to add to `hf` so it says `cfg.num_labels` (nothing when it already does: labels carried
    from the source keep their names)."""
    if not cfg.is_classifier or head_from_hf({**hf, "architectures": ["X" + CLASSIFIER_SUFFIX]})[1] == cfg.num_labels:
        return {}
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)}}


def rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        theta = hf.get("rope_theta", 10000.0)
        params = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
    # Rotating only part of each head (Phi-3.5/Phi-4-mini, StableLM) changes the math; a factor of 1 is the default.
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ValueError(f"partial rotary embedding (partial_rotary_factor={partial}) cannot be expressed by the "
                         f"canonical decoder, which rotates whole heads; nothing was converted")
    scaling = None if params.get("rope_type", "default") == "default" else params
    return float(theta), scaling


def rope_to_hf(cfg: CanonicalConfig, base: Optional[dict], legacy: bool = False) -> dict:
    """Rope keys in the style of `base` (4.x or 5.x); without a base, 5.x style, or 4.x when `legacy` (remote-code
    families written for transformers 4.x read `rope_theta` and `rope_scaling: {"type": ...}`).

    When `base` already says the same thing, its keys stay as they are (a round trip keeps e.g. Phi-3's
    `partial_rotary_factor: 1.0`).
    """
    if base is not None and rope_from_hf(base) == (cfg.rope_theta, cfg.rope_scaling):
        return {}
    if base is None and legacy:
        rs = dict(cfg.rope_scaling or {})
        return {"rope_theta": cfg.rope_theta, "rope_scaling": {"type": rs.pop("rope_type"), **rs} if rs else None}
    if base is not None and "rope_parameters" not in base and "rope_theta" in base:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    params = dict(cfg.rope_scaling) if cfg.rope_scaling else {"rope_type": "default"}
    params["rope_theta"] = cfg.rope_theta
    return {"rope_parameters": params}


@dataclass(frozen=True)
class ConfigField:
    """One `(hf_key, canonical_key)` pair of a family's config table.

    `default` is what a config that omits the key means (a callable receives the HF dict); `to_hf`/`to_canonical`
    convert values when the two sides disagree on representation; `aliases` are other spellings read (and kept on
    writing when the base config uses them), e.g. remote-code InternLM3's `qkv_bias` for `attention_bias`.
    `hf_key=None` marks a value the family's code derives and no config key can change (InternLM2's head_dim):
    it is read from `default` and never written, so a model that needs another value is refused.
    """

    hf_key: Optional[str]
    canonical_key: str
    default: Any = _MISSING
    to_canonical: Optional[Callable[[Any], Any]] = None
    to_hf: Optional[Callable[[Any], Any]] = None
    aliases: tuple[str, ...] = ()

    def read(self, v: Any) -> Any:
        return self.to_canonical(v) if self.to_canonical else v

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


def fields_without(fields: list[ConfigField], *hf_keys: str) -> list[ConfigField]:
    """A copy of a config table without the given HF keys (to start a family from Llama's table)."""
    return [f for f in fields if f.hf_key not in hf_keys]
