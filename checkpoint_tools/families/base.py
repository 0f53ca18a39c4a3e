"""What a family table is made of: a two-way config table and a two-way tensor table.

A family converts between its Hugging Face checkpoint and the canonical form (checkpoint_tools.canonical). The generic
machinery here does the work; a family module only declares what is special about it:

    ConfigField    one (hf_key, canonical_key) pair of the config table
    Rename         one HF tensor <-> one canonical tensor, optionally through a Fold (Gemma's 1 + w norms,
                   Granite's attention and residual multipliers)
    Fused          one HF tensor = canonical tensors concatenated on dim 0 (Phi-3 qkv_proj and gate_up_proj,
                   Baichuan2 W_pack)
    GroupedQKV     one HF tensor = q/k/v interleaved per KV group (InternLM2 wqkv; Megatron's own layout)
    EmbeddingHead  embedding and output head through folds (Gemma's embedding scale, Granite's multipliers,
                   Baichuan2's NormHead); folds that differ between the two untie them in canonical

Writing a family (`Family.plan_write`) first proves the family can express the model: the config is written, read
back through the same table and compared field by field, so a feature the family lacks is refused by name, never
approximated. Biases are the one thing filled or dropped: a bias the family has but the model lacks is written as
zeros; a bias the model has but the family lacks must be zero, else the conversion is refused.
"""
from __future__ import annotations

import abc

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from checkpoint_tools.canonical import (EMBED, LM_HEAD, CanonicalConfig, TensorSource, expected_shapes,
                                        expected_tensor_names)

_MISSING = object()

# Keys every family reads the same way (rope, dtype) or carries over untouched (bookkeeping, generation).
COMMON_KEYS = frozenset({
    "rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype", "architectures", "model_type",
    "transformers_version", "_name_or_path", "initializer_range", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "attention_dropout", "auto_map", "quantization_config", "_model_name_or_path",
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
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
}
BIAS_FLAGS = ("qkv_bias", "o_bias", "mlp_bias")


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


# ---------------------------------------------------------------------------------------------------------------
# Tensor mappings
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ctx:
    """What a mapping sees besides tensors: the family-side canonical config and the family's HF config dict."""

    cfg: CanonicalConfig
    hf: dict


@dataclass(frozen=True)
class Fold:
    """A value transform: canonical = fold(hf, ctx), hf = unfold(canonical, ctx).

    `trivial(ctx)` says the fold is the identity under this config (then a tied embedding can stay tied).
    """

    fold: Callable[[torch.Tensor, Ctx], torch.Tensor]
    unfold: Callable[[torch.Tensor, Ctx], torch.Tensor]
    trivial: Callable[[Ctx], bool] = lambda ctx: False


def _scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    # float32 arithmetic, as the families' own forward passes multiply by their Python-float multipliers
    if factor == 1.0:
        return t
    return (t.to(torch.float32) * factor).to(t.dtype)


def _div(t: torch.Tensor, factor: float) -> torch.Tensor:
    # divide (not multiply by 1/factor): (x * f) / f gives back x far more often
    if factor == 1.0:
        return t
    return (t.to(torch.float32) / factor).to(t.dtype)


def scale_by(factor: Callable[[Ctx], float]) -> Fold:
    """canonical = hf * factor(ctx) (a multiplier of the family's forward pass moved into the weight)."""
    return Fold(lambda t, c: _scale(t, factor(c)), lambda t, c: _div(t, factor(c)), lambda c: factor(c) == 1.0)


def divide_by(factor: Callable[[Ctx], float]) -> Fold:
    """canonical = hf / factor(ctx) (Granite divides its logits by logits_scaling)."""
    return Fold(lambda t, c: _div(t, factor(c)), lambda t, c: _scale(t, factor(c)), lambda c: factor(c) == 1.0)


@dataclass(frozen=True)
class Link:
    """One concrete relation between HF tensors and canonical tensors (a mapping instantiated for a config)."""

    hf: tuple[str, ...]
    canonical: tuple[str, ...]
    to_canonical: Callable[[list], list]
    to_hf: Callable[[list], list]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"\d+") + "$")


def _instances(templates: tuple[str, ...], ctx: Ctx) -> list[int]:
    """Layer indices (or [-1] for a global mapping) where every canonical tensor of the mapping exists."""
    have = expected_shapes(ctx.cfg)
    layers = range(ctx.cfg.num_layers) if any("{i}" in t for t in templates) else [-1]
    out = []
    for i in layers:
        present = [t.format(i=i) in have for t in templates]
        if all(present):
            out.append(i)
        elif any(present):
            raise AssertionError(f"family table error: {templates} are only partly present for layer {i}")
    return out


class Mapping(abc.ABC):
    """A declarative tensor mapping; `links(ctx)` instantiates it for one model."""

    hf_templates: tuple[str, ...] = ()

    @abc.abstractmethod
    def links(self, ctx: Ctx) -> list[Link]:
        """The concrete HF <-> canonical links of this mapping under `ctx`."""

    def knows(self, hf_name: str) -> bool:
        return any(_pattern(t).match(hf_name) for t in self.hf_templates)


@dataclass(frozen=True)
class Rename(Mapping):
    """A tensor that is the same array on both sides under another name (through `fold` if given); `{i}` is the
    layer index."""

    canonical: str
    hf: str
    fold: Optional[Fold] = None

    @property
    def hf_templates(self):
        return (self.hf,)

    def links(self, ctx):
        f = self.fold
        to_c = (lambda ts: ts) if f is None else (lambda ts: [f.fold(ts[0], ctx)])
        to_h = (lambda ts: ts) if f is None else (lambda ts: [f.unfold(ts[0], ctx)])
        return [Link((self.hf.format(i=i),), (self.canonical.format(i=i),), to_c, to_h)
                for i in _instances((self.canonical,), ctx)]


@dataclass(frozen=True)
class Fused(Mapping):
    """One HF tensor holding canonical tensors concatenated along dim 0::

        hf[sum(rows), ...] = cat([parts[0][rows0, ...], parts[1][rows1, ...], ...], dim=0)

    Phi-3's qkv_proj = cat(q, k, v) and gate_up_proj = cat(gate, up); Baichuan2's W_pack = cat(q, k, v).
    """

    hf: str
    parts: tuple[str, ...]

    @property
    def hf_templates(self):
        return (self.hf,)

    def links(self, ctx):
        shapes = expected_shapes(ctx.cfg)
        out = []
        for i in _instances(self.parts, ctx):
            names = tuple(p.format(i=i) for p in self.parts)
            rows = [shapes[n][0] for n in names]
            out.append(Link((self.hf.format(i=i),), names, lambda ts, rows=rows: list(torch.split(ts[0], rows)),
                            lambda ts: [torch.cat(ts)]))
        return out


@dataclass(frozen=True)
class GroupedQKV(Mapping):
    """q/k/v packed per KV group, as InternLM2's `wqkv` (and Megatron's linear_qkv)::

        hf[ng * (nq/ng + 2) * hd, ...] viewed as [ng, nq/ng + 2, hd, ...]:
            [g, :nq/ng]  = q heads g*nq/ng .. (g+1)*nq/ng - 1
            [g, nq/ng]   = k head g
            [g, nq/ng+1] = v head g
    """

    hf: str
    parts: tuple[str, str, str]

    @property
    def hf_templates(self):
        return (self.hf,)

    def links(self, ctx):
        c = ctx.cfg
        ng, per, hd = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim

        def unpack(ts):
            t = ts[0].reshape(ng, per + 2, hd, *ts[0].shape[1:])
            rest = ts[0].shape[1:]
            return [t[:, :per].reshape(ng * per * hd, *rest), t[:, per].reshape(ng * hd, *rest),
                    t[:, per + 1].reshape(ng * hd, *rest)]

        def pack(ts):
            q, k, v = ts
            rest = q.shape[1:]
            return [torch.cat([q.reshape(ng, per, hd, *rest), k.reshape(ng, 1, hd, *rest),
                               v.reshape(ng, 1, hd, *rest)], dim=1).reshape(-1, *rest)]

        return [Link((self.hf.format(i=i),), tuple(p.format(i=i) for p in self.parts), unpack, pack)
                for i in _instances(self.parts, ctx)]


@dataclass(frozen=True)
class EmbeddingHead(Mapping):
    """The embedding and the output head, each through an optional fold.

    With non-trivial folds a tied HF model becomes untied in canonical (embed = fold_e(E), head = fold_h(E)); on the
    way back the family ties again exactly when one tensor E reproduces both canonical tensors bit for bit.
    """

    embed: str = "model.embed_tokens.weight"
    head: str = "lm_head.weight"
    embed_fold: Optional[Fold] = None
    head_fold: Optional[Fold] = None

    @property
    def hf_templates(self):
        return (self.embed, self.head)

    def trivial(self, ctx: Ctx) -> bool:
        return all(f is None or f.trivial(ctx) for f in (self.embed_fold, self.head_fold))

    def _f(self, fold, t, ctx, back=False):
        return t if fold is None else (fold.unfold(t, ctx) if back else fold.fold(t, ctx))

    def tie_source(self, embed_c: torch.Tensor, head_c: torch.Tensor, ctx: Ctx) -> Optional[torch.Tensor]:
        """The one HF tensor both canonical tensors fold from, or None when they are not the fold of one tensor."""
        for fold, t in ((self.head_fold, head_c), (self.embed_fold, embed_c)):
            try:
                e = self._f(fold, t, ctx, back=True)
            except ValueError:  # e.g. a head Baichuan2's NormHead cannot hold
                continue
            if e.is_meta or (torch.equal(self._f(self.embed_fold, e, ctx), embed_c)
                             and torch.equal(self._f(self.head_fold, e, ctx), head_c)):
                return e
        return None

    def links(self, ctx):
        tied_hf = bool(ctx.hf.get("tie_word_embeddings", False))
        fe, fh = self.embed_fold, self.head_fold
        if ctx.cfg.tie_word_embeddings:  # identity folds: one tensor on both sides
            return [Link((self.embed,), (EMBED,), lambda ts: ts, lambda ts: ts)]
        if tied_hf:
            def back(ts):
                e = self.tie_source(ts[0], ts[1], ctx)
                if e is None:
                    raise AssertionError("tie was decided for tensors that are not the fold of one tensor")
                return [e]
            return [Link((self.embed,), (EMBED, LM_HEAD),
                         lambda ts: [self._f(fe, ts[0], ctx), self._f(fh, ts[0], ctx)], back)]
        return [Link((self.embed,), (EMBED,), lambda ts: [self._f(fe, ts[0], ctx)],
                     lambda ts: [self._f(fe, ts[0], ctx, back=True)]),
                Link((self.head,), (LM_HEAD,), lambda ts: [self._f(fh, ts[0], ctx)],
                     lambda ts: [self._f(fh, ts[0], ctx, back=True)])]


# ---------------------------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class WritePlan:
    """Everything needed to write `source` as a family checkpoint: config, links, zero-filled biases."""

    hf_config: dict
    links: list[Link]
    source: TensorSource
    zero_fill: dict[str, tuple[int, ...]]
    dtype: torch.dtype  # of zero-filled biases: the embedding's

    def link_dtype(self, link: Link) -> torch.dtype:
        name = next((n for n in link.canonical if n not in self.zero_fill), None)
        if name is None:
            return self.dtype
        return self.source.dtype_of(EMBED if name == LM_HEAD and self.source.config.tie_word_embeddings else name)

    def inputs(self, link: Link) -> list[torch.Tensor]:
        out = []
        for n in link.canonical:
            if n in self.zero_fill:
                out.append(torch.zeros(self.zero_fill[n], dtype=self.link_dtype(link)))
            elif n == LM_HEAD and self.source.config.tie_word_embeddings:
                out.append(self.source.get(EMBED))
            else:
                out.append(self.source.get(n))
        return out

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(hf name, shape, dtype) of every tensor to write, in order (shapes from the links run on meta tensors)."""
        shapes = expected_shapes(self.source.config)
        specs = []
        for link in self.links:
            dtype = self.link_dtype(link)
            metas = [torch.empty(self.zero_fill.get(n) or shapes.get(n) or shapes[EMBED], dtype=dtype, device="meta")
                     for n in link.canonical]
            specs += [(name, tuple(t.shape), dtype) for name, t in zip(link.hf, link.to_hf(metas))]
        return specs


@dataclass
class Family:
    """A model family's declarative description (see checkpoint_tools/families/llama.py for the shape)."""

    model_type: str
    architecture: str
    config_fields: list[ConfigField]
    tensors: list[Mapping]
    # HF config keys with no architectural meaning: carried over as they are, never a reason to refuse.
    passthrough_keys: frozenset = frozenset()
    # HF config keys the family itself interprets (multipliers, sliding windows), with the value written when the
    # base config lacks them (a callable receives the CanonicalConfig).
    own_keys: dict = field(default_factory=dict)
    # Canonical values the family always has (Qwen2's q/k/v bias, Qwen3's q/k norm).
    constants: dict = field(default_factory=dict)
    # Bias switches that cover several canonical tensors (Llama's attention_bias: q/k/v and o): when any is on the
    # whole group is written, with zeros for the biases the model lacks.
    bias_groups: tuple[tuple[str, ...], ...] = ()
    # False for families whose code fixes the rotary base at 10000 and has no rope keys (Baichuan2-7B).
    rope_keys: bool = True
    # Remote-code families written against transformers 4.x: without a base config, rope keys in 4.x style
    # (`rope_theta`, `rope_scaling: {"type": ...}`) and `torch_dtype`, which is what their code reads.
    legacy_config: bool = False
    # HF tensor names that hold no weights (e.g. rotary inv_freq buffers): dropped on purpose, by pattern.
    drop_tensors: tuple[str, ...] = ()
    # Called with the HF config dict before the table is applied; raises for what canonical can't hold.
    check_hf_config: Optional[Callable[[dict], None]] = None
    # Called with a CanonicalConfig before writing this family; raises naming a feature the family lacks.
    check_canonical: Optional[Callable[[CanonicalConfig], None]] = None
    # Called with (canonical values dict, HF config) after the table, for what one field cannot say alone.
    finish_config: Optional[Callable[[dict, dict], None]] = None
    # Other names the family answers to (`--to qwen`, `trans_qwen_to_llama`).
    aliases: tuple[str, ...] = ()

    # ---- config ----
    def known_keys(self) -> set:
        keys = {k for f in self.config_fields for k in (f.hf_key, *f.aliases) if k}
        return keys | set(self.passthrough_keys) | set(self.own_keys) | COMMON_KEYS

    def config_to_canonical(self, hf: dict, dtype: Optional[str] = None) -> CanonicalConfig:
        """Apply the table; `dtype` is the tensors' real dtype (configs often omit or misstate it)."""
        if self.check_hf_config:
            self.check_hf_config(hf)
        unknown = sorted(k for k in hf if k not in self.known_keys())
        if unknown:
            raise ValueError(
                f"{self.model_type} config has fields this converter does not know: {unknown}. They may change "
                f"the architecture, so nothing was converted; extend checkpoint_tools/families/{self.model_type}.py"
            )
        values: dict[str, Any] = {}
        for f in self.config_fields:
            key = next((k for k in (f.hf_key, *f.aliases) if k and k in hf), None)
            if key is not None:
                v = hf[key]
            elif f.canonical_key in values:
                continue  # an earlier key of the table already supplied it
            elif f.default is _MISSING:
                raise ValueError(f"{self.model_type} config lacks required field {f.hf_key!r}")
            else:
                v = f.default(hf) if callable(f.default) else f.default
            values[f.canonical_key] = f.read(v)
        values.update(self.constants)
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf) if self.rope_keys else (10000.0, None)
        values["dtype"] = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if self.finish_config:
            self.finish_config(values, hf)
        cfg = CanonicalConfig(**values)
        emb = self.embedding()
        if emb is not None and cfg.tie_word_embeddings and not emb.trivial(Ctx(cfg, hf)):
            cfg.tie_word_embeddings = False  # the folds make embedding and head two different tensors
        cfg.validate()
        return cfg

    def config_from_canonical(self, cfg: CanonicalConfig, base: Optional[dict] = None) -> dict:
        """The HF config dict for `cfg`, written over `base` (the source config recorded at import) if given."""
        out = dict(base or {})
        out["model_type"] = self.model_type
        out["architectures"] = (base or {}).get("architectures") or [self.architecture]
        written: dict[str, Any] = {}
        for f in self.config_fields:
            if f.hf_key is None:
                continue  # derived by the family's code; the read-back comparison refuses another value
            v = getattr(cfg, f.canonical_key)
            key = next((a for a in f.aliases if base and a in base and f.hf_key not in base), f.hf_key)
            if base is not None and key not in base and f.default is not _MISSING:
                d = f.default(base) if callable(f.default) else f.default
                if f.read(d) == v:
                    continue  # the base leaves it to the default, which still holds (e.g. Qwen2's head_dim)
            if base and key in base and f.read(base[key]) == v:
                hv = base[key]  # keep the base's spelling of the same value (Gemma's legacy "gelu")
            else:
                hv = f.to_hf(v) if f.to_hf else v
            if key in written and written[key] != hv:
                raise ValueError(
                    f"{self.model_type} cannot express this model: {key} would have to be both "
                    f"{written[key]!r} and {hv!r}")
            written[key] = hv
        out.update(written)
        for k, d in self.own_keys.items():
            if k not in out:
                out[k] = d(cfg) if callable(d) else d
        if self.rope_keys:
            out.update(rope_to_hf(cfg, base, legacy=self.legacy_config))
        legacy_dtype = ("torch_dtype" in out or (base is None and self.legacy_config)) and "dtype" not in out
        out["torch_dtype" if legacy_dtype else "dtype"] = cfg.dtype
        return out

    def widen(self, cfg: CanonicalConfig) -> CanonicalConfig:
        """`cfg` with every bias group this family writes as one switch turned on together."""
        values = cfg.to_dict()
        for group in self.bias_groups:
            if any(values[b] for b in group):
                values.update({b: True for b in group})
        return CanonicalConfig.from_dict(values)

    # ---- tensors ----
    def embedding(self) -> Optional[EmbeddingHead]:
        return next((m for m in self.tensors if isinstance(m, EmbeddingHead)), None)

    def embed_hf_name(self) -> str:
        """The HF name of the embedding (its dtype is the checkpoint's dtype)."""
        emb = self.embedding()
        if emb is not None:
            return emb.embed
        return next(m.hf for m in self.tensors if isinstance(m, Rename) and m.canonical == EMBED)

    def knows_hf_name(self, name: str) -> Optional[bool]:
        """True for a mapped name, False for an intentional drop, None when no mapping knows it."""
        if any(re.search(p, name) for p in self.drop_tensors):
            return False
        return True if any(m.knows(name) for m in self.tensors) else None

    def links(self, cfg: CanonicalConfig, hf: dict) -> list[Link]:
        """Every tensor relation of this model, in canonical write order (embedding, layers, norm, head)."""
        ctx = Ctx(cfg, hf)
        links = [link for m in self.tensors for link in m.links(ctx)]
        order = {n: i for i, n in enumerate(expected_tensor_names(cfg))}
        seen = [c for link in links for c in link.canonical]
        assert len(seen) == len(set(seen)) and set(seen) == set(order), \
            f"{self.model_type} table does not cover canonical tensors exactly once: {sorted(set(order) ^ set(seen))}"
        return sorted(links, key=lambda link: min(order[c] for c in link.canonical))

    def plan_write(self, source: TensorSource, base: Optional[dict] = None,
                   carry: Optional[dict] = None) -> WritePlan:
        """Prove this family can express `source` and plan its tensors; raises naming what it cannot express.

        `base` is the source config of this same family (kept, then overwritten by the table); `carry` is another
        family's config, of which only the bookkeeping CARRY_KEYS are kept.
        """
        cfg = source.config
        if self.check_canonical:
            self.check_canonical(cfg)
        cfg_w = self.widen(cfg)
        hf = self.config_from_canonical(cfg_w, base)
        for k in CARRY_KEYS & set(carry or {}):
            hf.setdefault(k, carry[k])
        emb = self.embedding()
        folded = emb is not None and not emb.trivial(Ctx(cfg_w, hf))
        if folded:
            # Tie when one tensor folds to both canonical tensors (and the recorded source was tied, if any).
            embed_c = source.get(EMBED)
            head_c = embed_c if cfg.tie_word_embeddings else source.get(LM_HEAD)
            foldable = emb.tie_source(embed_c, head_c, Ctx(cfg_w, hf)) is not None
            hf["tie_word_embeddings"] = foldable and bool((base or {}).get("tie_word_embeddings", True))
            source.release()
        cfg_t = self.config_to_canonical(hf, dtype=cfg.dtype)
        self._check_expressible(cfg_w, cfg_t, skip=("tie_word_embeddings",) if folded else ())
        links = self.links(cfg_t, hf)
        needed = [n for link in links for n in link.canonical]
        have = set(source.names())
        shapes_t = expected_shapes(cfg_t)
        zero_fill = {}
        for n in needed:
            if n in have or (n == LM_HEAD and cfg.tie_word_embeddings):
                continue
            if not n.endswith(".bias"):
                raise AssertionError(f"{self.model_type}: {n} is needed but the source has no such tensor")
            zero_fill[n] = shapes_t[n]
        for n in sorted(have - set(needed)):
            if not n.endswith(".bias"):
                raise AssertionError(f"{self.model_type}: source tensor {n} has no place in the target")
            if torch.count_nonzero(source.get(n)):
                raise ValueError(
                    f"{n} is nonzero, but {self.model_type} has no such bias ({self._bias_flag(n)}=False in "
                    f"{self.architecture}); it cannot be expressed, so nothing was written")
        source.release()
        return WritePlan(hf, links, source, zero_fill, source.dtype_of(EMBED))

    def _check_expressible(self, cfg: CanonicalConfig, cfg_t: CanonicalConfig, skip: tuple = ()) -> None:
        for name, what in FEATURES.items():
            if name in skip:
                continue
            want, got = getattr(cfg, name), getattr(cfg_t, name)
            if want != got:
                raise ValueError(
                    f"{self.model_type} ({self.architecture}) cannot express {what}: the model has {name}={want!r}, "
                    f"but a {self.model_type} config can only say {name}={got!r}; nothing was written (convert to "
                    f"a family or to Megatron that has it)")

    @staticmethod
    def _bias_flag(name: str) -> str:
        return "o_bias" if ".o_proj." in name else "mlp_bias" if ".mlp." in name else "qkv_bias"


def hf_tensor_problems(links: list[Link], present: dict[str, tuple], cfg: CanonicalConfig) -> list[str]:
    """What is wrong between the HF tensors a config implies (through `links`) and those present (name -> shape)."""
    want = [h for link in links for h in link.hf]
    missing = [n for n in want if n not in present]
    unknown = [n for n in present if n not in set(want)]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:20]}")
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): {unknown[:20]}")
    if not problems:
        shapes = expected_shapes(cfg)
        bad = []
        for link in links:
            metas = [torch.empty(present[h], device="meta") for h in link.hf]
            try:
                got = [tuple(t.shape) for t in link.to_canonical(metas)]
            except RuntimeError as e:
                got = [str(e).splitlines()[0]]
            if got != [shapes[c] for c in link.canonical]:
                bad.append(f"{list(link.hf)}: {[present[h] for h in link.hf]} does not give "
                           f"{[shapes[c] for c in link.canonical]}")
        if bad:
            problems.append(f"shape mismatches ({len(bad)}): {bad[:20]}")
    return problems


def refuse_sliding_window(hf: dict) -> None:
    """Sliding-window attention changes outputs past the window; canonical (and Llama) attend to everything."""
    window = hf.get("sliding_window")
    limit = hf.get("max_position_embeddings")
    if hf.get("use_sliding_window", True) and window is not None and (limit is None or window < limit):
        raise ValueError(f"sliding-window attention (sliding_window={window} < max_position_embeddings={limit}) "
                         f"cannot be expressed by the canonical (Llama-shaped) decoder; nothing was converted")
    other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types {other} (not full attention) cannot be expressed by the canonical decoder; "
                         f"nothing was converted")


def fields_without(fields: list[ConfigField], *hf_keys: str) -> list[ConfigField]:
    """A copy of a config table without the given HF keys (to start a family from Llama's table)."""
    return [f for f in fields if f.hf_key not in hf_keys]


def rope_scaling_limited_to(family: str, *types: str) -> Callable[[CanonicalConfig], None]:
    """A check_canonical for families whose code knows only some rope scalings (Phi-3: LongRoPE; InternLM2)."""
    def check(cfg: CanonicalConfig) -> None:
        kind = (cfg.rope_scaling or {}).get("rope_type")
        if cfg.rope_scaling and kind not in types:
            raise ValueError(f"{family} cannot express rope scaling of type {kind!r} (its code knows "
                             f"{list(types) or 'none'}); nothing was written")
    return check
