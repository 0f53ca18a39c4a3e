"""What a family table is made of: a two-way config table and a two-way tensor-name table.

A family converts between its Hugging Face checkpoint and the canonical form (checkpoint_tools.canonical). The
generic machinery here does the work; a family module only declares what is special about it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from checkpoint_tools.canonical import CanonicalConfig

_MISSING = object()

# Keys every family reads the same way (rope, dtype) or carries over untouched (bookkeeping, generation).
COMMON_KEYS = frozenset({
    "rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype", "architectures", "model_type",
    "transformers_version", "_name_or_path", "initializer_range", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "attention_dropout", "auto_map", "quantization_config", "_model_name_or_path",
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
})


def rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = None if params.get("rope_type", "default") == "default" else params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
        if scaling and "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
    return float(theta), scaling


def rope_to_hf(cfg: CanonicalConfig, base: Optional[dict]) -> dict:
    """Rope keys in the style of `base` (4.x or 5.x); 5.x style when there is no base."""
    if base is not None and "rope_parameters" not in base and "rope_theta" in base:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    params = dict(cfg.rope_scaling) if cfg.rope_scaling else {"rope_type": "default"}
    params["rope_theta"] = cfg.rope_theta
    return {"rope_parameters": params}


@dataclass(frozen=True)
class ConfigField:
    """One `(hf_key, canonical_key)` pair of a family's config table.

    `default` is what a config that omits the key means (a callable receives the HF dict); `to_hf`/`to_canonical`
    convert values when the two sides disagree on representation.
    """

    hf_key: str
    canonical_key: str
    default: Any = _MISSING
    to_canonical: Optional[Callable[[Any], Any]] = None
    to_hf: Optional[Callable[[Any], Any]] = None


@dataclass(frozen=True)
class Rename:
    """A tensor that is the same array on both sides under another name; `{i}` is the layer index."""

    canonical: str
    hf: str

    def __post_init__(self):
        pattern = re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)")
        object.__setattr__(self, "_hf_re", re.compile(f"^{pattern}$"))

    def hf_name(self, canonical_name_layer: Optional[int]) -> str:
        return self.hf.format(i=canonical_name_layer)

    def match_hf(self, name: str) -> Optional[int]:
        """-1 for a match without a layer index, the layer index for a layer match, None for no match."""
        m = self._hf_re.match(name)
        if not m:
            return None
        return int(m.group("i")) if "i" in m.groupdict() else -1


@dataclass
class Family:
    """A model family's declarative description (see checkpoint_tools/families/llama.py for the shape)."""

    model_type: str
    architecture: str
    config_fields: list[ConfigField]
    tensors: list[Rename]
    # HF config keys with no architectural meaning: carried over as they are, never a reason to refuse.
    passthrough_keys: frozenset = frozenset()
    # HF tensor names that hold no weights (e.g. rotary inv_freq buffers): dropped on purpose, by pattern.
    drop_tensors: tuple[str, ...] = ()
    # Called with (hf_config_dict, canonical) after the table is applied; raises for what canonical can't hold.
    check_hf_config: Optional[Callable[[dict], None]] = None
    # Called with a CanonicalConfig before writing this family; raises naming a feature the family lacks.
    check_canonical: Optional[Callable[[CanonicalConfig], None]] = None
    aliases: tuple[str, ...] = field(default=())

    # ---- config ----
    def config_to_canonical(self, hf: dict, dtype: Optional[str] = None) -> CanonicalConfig:
        """Apply the table; `dtype` is the tensors' real dtype (configs often omit or misstate it)."""
        if self.check_hf_config:
            self.check_hf_config(hf)
        known = {f.hf_key for f in self.config_fields} | set(self.passthrough_keys) | COMMON_KEYS
        unknown = sorted(k for k in hf if k not in known)
        if unknown:
            raise ValueError(
                f"{self.model_type} config has fields this converter does not know: {unknown}. They may change "
                f"the architecture, so nothing was converted; extend checkpoint_tools/families/{self.model_type}.py"
            )
        values: dict[str, Any] = {}
        for f in self.config_fields:
            if f.hf_key in hf:
                v = hf[f.hf_key]
            elif f.canonical_key in values:
                continue  # an earlier key of the table already supplied it
            elif f.default is _MISSING:
                raise ValueError(f"{self.model_type} config lacks required field {f.hf_key!r}")
            else:
                v = f.default(hf) if callable(f.default) else f.default
            values[f.canonical_key] = f.to_canonical(v) if f.to_canonical else v
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf)
        values["dtype"] = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        cfg = CanonicalConfig(**values)
        cfg.validate()
        return cfg

    def config_from_canonical(self, cfg: CanonicalConfig, base: Optional[dict] = None) -> dict:
        """The HF config dict for `cfg`, written over `base` (the source config recorded at import) if given."""
        if self.check_canonical:
            self.check_canonical(cfg)
        out = dict(base or {})
        out["model_type"] = self.model_type
        out["architectures"] = [self.architecture]
        written: dict[str, Any] = {}
        for f in self.config_fields:
            v = getattr(cfg, f.canonical_key)
            v = f.to_hf(v) if f.to_hf else v
            if f.hf_key in written and written[f.hf_key] != v:
                raise ValueError(
                    f"{self.model_type} cannot express this model: {f.hf_key} would have to be both "
                    f"{written[f.hf_key]!r} and {v!r}")
            written[f.hf_key] = v
        out.update(written)
        out.update(rope_to_hf(cfg, base))
        out["torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"] = cfg.dtype
        return out

    # ---- tensors ----
    def hf_to_canonical_name(self, name: str) -> Optional[str]:
        """The canonical name of HF tensor `name`; None for an intentional drop; KeyError when unknown."""
        for pat in self.drop_tensors:
            if re.search(pat, name):
                return None
        for r in self.tensors:
            layer = r.match_hf(name)
            if layer is not None:
                return r.canonical.format(i=layer)
        raise KeyError(name)

    def canonical_to_hf_name(self, name: str) -> str:
        for r in self.tensors:
            pattern = re.escape(r.canonical).replace(r"\{i\}", r"(?P<i>\d+)")
            m = re.match(f"^{pattern}$", name)
            if m:
                return r.hf.format(i=int(m.group("i"))) if "i" in m.groupdict() else r.hf
        raise KeyError(f"{self.model_type} has no name for canonical tensor {name}")
