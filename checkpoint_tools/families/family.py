"""A model family: its config table and tensor table, and the generic machinery that applies them.

A family converts between its Hugging Face checkpoint and the canonical form (checkpoint_tools.canonical). The
machinery here does the work; a family module only declares what is special about it (config fields in
config_table.py, tensor mappings in mappings.py, shared refusals in checks.py).

Writing a family (`Family.plan_write`) first proves the family can express the model: the config is written, read
back through the same table and compared field by field, so a feature the family lacks is refused by name, never
approximated. Biases are the one thing filled or dropped: a bias the family has but the model lacks is written as
zeros; a bias the model has but the family lacks must be zero, else the conversion is refused.

A reward model (a `…ForSequenceClassification` checkpoint: `score.weight` instead of `lm_head.weight`) converts
between the families that name a `classifier` class; the others refuse it by name, reading or writing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from checkpoint_tools.canonical import (EMBED, LM_HEAD, CanonicalConfig, TensorSource, expected_shapes,
                                        expected_tensor_names)
from checkpoint_tools.families.config_table import (CARRY_KEYS, CLASSIFIER_SUFFIX, COMMON_KEYS, FEATURES,
                                                    ConfigField, head_from_hf, labels_to_hf, rope_from_hf,
                                                    rope_to_hf)
from checkpoint_tools.families.mappings import Ctx, EmbeddingHead, Link, Mapping, Rename
from checkpoint_tools.lazy_torch import torch  # reading a config needs none; planning a write does


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

    def parts(self, link: Link) -> Optional[tuple[list[torch.Tensor], int]]:
        """An identity link's one tensor as the source holds it, (blocks, the dim they concatenate along): column
        blocks where the source has them (TensorSource.get_column_parts), else row blocks (get_parts). None for
        any other link: its values go through `to_hf`."""
        (n,) = link.canonical if link.identity and len(link.canonical) == 1 else (None,)
        if n is None or n in self.zero_fill:
            return None
        n = EMBED if n == LM_HEAD and self.source.config.tie_word_embeddings else n
        columns = self.source.get_column_parts(n)
        return (columns, 1) if columns is not None else (self.source.get_parts(n), 0)

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
    # The family's sequence-classification class in transformers (a reward model: `score.weight`, num_labels=1 in
    # TRL), whose tensors are the causal LM's with `score.weight` for `lm_head.weight`; None: it has none, and a
    # score head is refused by name.
    classifier: Optional[str] = None

    def refuse_classifier(self, num_labels, hidden_size, reading: bool) -> None:
        from checkpoint_tools.families import FAMILIES  # the registry imports this module

        able = sorted(f.model_type for f in FAMILIES.values() if f.classifier)
        doing = "read as" if reading else "written as"
        raise ValueError(
            f"a sequence-classification (reward) model (score.weight [{num_labels}, {hidden_size}]) cannot be "
            f"{doing} {self.model_type}: {self.architecture} has no {CLASSIFIER_SUFFIX} counterpart in transformers; "
            f"nothing was converted (families with one: {', '.join(able)})")

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
            elif not f.has_default:
                raise ValueError(f"{self.model_type} config lacks required field {f.hf_key!r}")
            else:
                v = f.default(hf) if callable(f.default) else f.default
            values[f.canonical_key] = f.read(v)
        values.update(self.constants)
        values["task"], values["num_labels"] = head_from_hf(hf)
        if values["num_labels"] is not None and not self.classifier:
            self.refuse_classifier(values["num_labels"], values.get("hidden_size"), reading=True)
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf) if self.rope_keys else (10000.0, None)
        values["dtype"] = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if self.finish_config:
            self.finish_config(values, hf)
        cfg = CanonicalConfig(**values)
        emb = self.embedding()
        if emb is not None and cfg.tie_word_embeddings and not cfg.is_classifier and not emb.trivial(Ctx(cfg, hf)):
            cfg.tie_word_embeddings = False  # the folds make embedding and head two different tensors
        cfg.validate()
        return cfg

    def config_from_canonical(self, cfg: CanonicalConfig, base: Optional[dict] = None,
                              carry: Optional[dict] = None) -> dict:
        """The HF config dict for `cfg`, written over `base` (the source config recorded at import) if given;
        `carry` is another family's config, of which only the bookkeeping CARRY_KEYS (labels included) are kept."""
        out = dict(base or {})
        out["model_type"] = self.model_type
        if cfg.is_classifier and not self.classifier:
            self.refuse_classifier(cfg.num_labels, cfg.hidden_size, reading=False)
        recorded = (base or {}).get("architectures")
        same_head = recorded and head_from_hf({"architectures": recorded})[0] == cfg.task
        out["architectures"] = recorded if same_head else [self.classifier if cfg.is_classifier else self.architecture]
        written: dict[str, Any] = {}
        for f in self.config_fields:
            if f.hf_key is None:
                continue  # derived by the family's code; the read-back comparison refuses another value
            v = getattr(cfg, f.canonical_key)
            key = next((a for a in f.aliases if base and a in base and f.hf_key not in base), f.hf_key)
            if base is not None and key not in base and f.has_default:
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
        for k in CARRY_KEYS & set(carry or {}):
            out.setdefault(k, carry[k])
        out.update(labels_to_hf(cfg, out))
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
        hf = self.config_from_canonical(cfg_w, base, carry)
        emb = self.embedding()
        # a classifier has no output head to tie: its embedding folds alone
        folded = emb is not None and not cfg.is_classifier and not emb.trivial(Ctx(cfg_w, hf))
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
