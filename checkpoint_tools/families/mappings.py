"""The tensor half of a family table: declarative mappings between HF tensors and canonical tensors.

    Rename         one HF tensor <-> one canonical tensor, optionally through a Fold (Gemma's 1 + w norms,
                   Granite's attention and residual multipliers)
    Fused          one HF tensor = canonical tensors concatenated on dim 0 (Phi-3 qkv_proj and gate_up_proj,
                   Baichuan2 W_pack)
    GroupedQKV     one HF tensor = q/k/v interleaved per KV group (InternLM2 wqkv; Megatron's own layout)
    EmbeddingHead  embedding and output head through folds (Gemma's embedding scale, Granite's multipliers,
                   Baichuan2's NormHead); folds that differ between the two untie them in canonical

A mapping is instantiated for one model (`links(ctx)`) into Links: pure functions both ways on lists of tensors,
and the same relation on shapes alone (`canonical_shapes`), so a checkpoint is checked against its config from its
headers, without torch.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Callable, Optional

from checkpoint_tools.canonical import EMBED, LM_HEAD, CanonicalConfig, expected_shapes
from checkpoint_tools.grouped_qkv import pack_grouped_qkv, unpack_grouped_qkv
from checkpoint_tools.lazy_torch import torch  # the tables are read (inspect) without moving tensors

Shapes = list[tuple[int, ...]]


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


def _same_shapes(shapes: Shapes) -> Shapes:
    return list(shapes)


def _split_rows(rows: list[int]) -> Callable[[Shapes], Shapes]:
    """The shapes `torch.split(t, rows)` gives for one tensor t of the given shape (ValueError when it cannot)."""
    def shapes(hf_shapes: Shapes) -> Shapes:
        (s,) = hf_shapes
        if not s or s[0] != sum(rows):
            raise ValueError(f"{s} does not split into rows {rows}")
        return [(r, *s[1:]) for r in rows]
    return shapes


@dataclass(frozen=True)
class Link:
    """One concrete relation between HF tensors and canonical tensors (a mapping instantiated for a config)."""

    hf: tuple[str, ...]
    canonical: tuple[str, ...]
    to_canonical: Callable[[list], list]
    to_hf: Callable[[list], list]
    # The shapes `to_canonical` gives for HF tensors of the given shapes, computed from shapes alone (ValueError
    # when they cannot be split so); folds keep shapes, so a one-to-one link keeps them too.
    canonical_shapes: Callable[[Shapes], Shapes] = _same_shapes
    # One tensor, the same values on both sides: a writer may stream the source's pieces of it (TP shards)
    # straight to the file instead of calling to_hf on the whole tensor.
    identity: bool = False


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
        same = f is None or f.trivial(ctx)
        return [Link((self.hf.format(i=i),), (self.canonical.format(i=i),), to_c, to_h, identity=same)
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
                            lambda ts: [torch.cat(ts)], _split_rows(rows)))
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
            return unpack_grouped_qkv(ts[0], ng * per, ng, hd, self.hf)

        def pack(ts):
            return [pack_grouped_qkv(*ts, ng, hd)]

        def shapes(hf_shapes):  # q, k and v rows out of whole groups: a row count that fits is all that matters
            return _split_rows([ng * per * hd, ng * hd, ng * hd])(hf_shapes)

        return [Link((self.hf.format(i=i),), tuple(p.format(i=i) for p in self.parts), unpack, pack, shapes)
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
        if ctx.cfg.is_classifier:  # a score head instead of the output head: the embedding alone, through its fold
            return [Link((self.embed,), (EMBED,), lambda ts: [self._f(fe, ts[0], ctx)],
                         lambda ts: [self._f(fe, ts[0], ctx, back=True)])]
        if ctx.cfg.tie_word_embeddings:  # identity folds: one tensor on both sides
            return [Link((self.embed,), (EMBED,), lambda ts: ts, lambda ts: ts)]
        if tied_hf:
            def back(ts):
                e = self.tie_source(ts[0], ts[1], ctx)
                if e is None:
                    raise AssertionError("tie was decided for tensors that are not the fold of one tensor")
                return [e]
            return [Link((self.embed,), (EMBED, LM_HEAD),
                         lambda ts: [self._f(fe, ts[0], ctx), self._f(fh, ts[0], ctx)], back,
                         lambda shapes: [shapes[0], shapes[0]])]
        return [Link((self.embed,), (EMBED,), lambda ts: [self._f(fe, ts[0], ctx)],
                     lambda ts: [self._f(fe, ts[0], ctx, back=True)]),
                Link((self.head,), (LM_HEAD,), lambda ts: [self._f(fh, ts[0], ctx)],
                     lambda ts: [self._f(fh, ts[0], ctx, back=True)])]
