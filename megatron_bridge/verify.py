"""Proof that a conversion is right: bit-exact round trip and megatron-core logits against Hugging Face.

`verify(hf_dir, megatron_dir)` converts the Megatron checkpoint back to Hugging Face in a temporary folder and
compares every tensor bit for bit, the config and the tokenizer files; then it runs the Megatron checkpoint in real
megatron-core, built from its own `args` at its own TP/PP under torchrun, and compares its logits with the
`transformers` model's in fp32.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from checkpoint_tools.hf_checkpoint import asset_files, read_hf_config
from checkpoint_tools.torch_bin_io import open_hf_weights
from megatron_bridge import legacy_format
from megatron_bridge.mcore_launcher import run_mcore_jobs

DEFAULT_TOLERANCE = 1e-4


@dataclass
class RoundTrip:
    tensors_total: int = 0
    tensors_equal: int = 0
    mismatched: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    config_equal: bool = False
    config_diff: dict = field(default_factory=dict)
    assets_total: int = 0
    assets_equal: int = 0
    # "source" when compared with the source folder; "family round trip" when the family folds arithmetic into its
    # weights (Gemma, Granite, Baichuan2) and the comparison is with the family's own trip through canonical.
    reference: str = "source"

    @property
    def ok(self) -> bool:
        return (not self.mismatched and not self.missing and not self.extra and self.config_equal
                and self.assets_equal == self.assets_total)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def compare_hf_dirs(a: str, b: str, allow_globals: Iterable[str] = ()) -> RoundTrip:
    """Compare two HF folders tensor by tensor (bitwise, streaming), config by value, assets byte by byte."""
    # a source may be pytorch_model.bin, read through the trust policy (plus the globals the user trusts)
    ra, rb = open_hf_weights(a, allow_globals), open_hf_weights(b, allow_globals)
    out = RoundTrip()
    na, nb = set(ra.names()), set(rb.names())
    out.missing, out.extra = sorted(na - nb), sorted(nb - na)
    for name in sorted(na & nb):
        out.tensors_total += 1
        x, y = ra.get(name), rb.get(name)
        if x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y)):
            out.tensors_equal += 1
        else:
            out.mismatched.append(name)
        ra.release()
        rb.release()
    ca, cb = read_hf_config(a), read_hf_config(b)
    ignore = {"transformers_version"}
    out.config_diff = {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb)
                       if k not in ignore and ca.get(k) != cb.get(k)}
    out.config_equal = not out.config_diff
    for name in asset_files(a):
        out.assets_total += 1
        p = os.path.join(b, name)
        if os.path.exists(p) and open(os.path.join(a, name), "rb").read() == open(p, "rb").read():
            out.assets_equal += 1
    return out


def family_round_trip(hf_dir: str, dst: str, allow_globals: Iterable[str] = ()) -> str:
    """The source family's own HF -> canonical -> HF trip: what a folding family must come back as."""
    from checkpoint_tools.family_convert import convert_family

    return convert_family(hf_dir, dst, read_hf_config(hf_dir)["model_type"], progress=False,
                          allow_globals=allow_globals)


def megatron_world_size(megatron_dir: str, allow_globals: Iterable[str] = ()) -> int:
    """TP*PP of a legacy or torch_dist checkpoint (the processes megatron-core runs it with)."""
    from megatron_bridge import torch_dist_format
    from megatron_bridge.megatron_args import parallel_sizes

    if torch_dist_format.is_torch_dist_checkpoint(megatron_dir):
        tp, pp, _ = parallel_sizes(torch_dist_format.validate(megatron_dir, allow_globals)["args"])
        return tp * pp
    ckpt = legacy_format.open_legacy(megatron_dir, allow_globals, check_data=False)
    return ckpt.tp * ckpt.pp


def hf_model(hf_dir: str, dtype=torch.float32, allow_globals: Iterable[str] = ()):
    """The `transformers` model of `hf_dir`; pytorch_model.bin weights are read through the project's trust policy
    (transformers' own .bin reader knows nothing of --allow-global) and handed over as a state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from checkpoint_tools.torch_bin_io import TorchBinDir

    weights = open_hf_weights(hf_dir, allow_globals)
    if isinstance(weights, TorchBinDir):
        from transformers.models.auto.auto_factory import _get_model_class

        config = AutoConfig.from_pretrained(hf_dir)
        cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)
        state = {n: weights.get(n) for n in weights.names()}
        return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


def hf_logits(hf_dir: str, tokens: torch.Tensor, allow_globals: Iterable[str] = ()) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(hf_dir, allow_globals=allow_globals)(tokens).logits.float()


def reference_logits(hf_dir: str, tokens: torch.Tensor, allow_globals: Iterable[str] = ()) -> tuple[torch.Tensor, str]:
    """Logits of the family's own `transformers` class; for a family without one (InternLM2, Baichuan2, remote Yi)
    those of `LlamaForCausalLM` on the family converted to Llama by its table. Returns (logits, what ran)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError):
        from checkpoint_tools.family_convert import convert_family

        with tempfile.TemporaryDirectory(prefix="verify-ref-") as tmp:
            llama = convert_family(hf_dir, os.path.join(tmp, "llama"), "llama", progress=False,
                                   allow_globals=allow_globals)
            return hf_logits(llama, tokens), "LlamaForCausalLM on the family converted to Llama (no transformers class)"
    return hf_logits(hf_dir, tokens, allow_globals), "transformers " + "/".join(read_hf_config(hf_dir).get("architectures") or ["?"])


def probe_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


@dataclass
class LogitsReport:
    max_abs: float
    mean_abs: float
    argmax_agree: int
    positions: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def compare_logits(ref: torch.Tensor, got: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> LogitsReport:
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}")
    diff = (ref - got).abs()
    agree = int((ref.argmax(-1) == got.argmax(-1)).sum())
    return LogitsReport(float(diff.max()), float(diff.mean()), agree, ref.shape[0] * ref.shape[1], tolerance)


@dataclass
class VerifyReport:
    round_trip: Optional[RoundTrip]
    logits: Optional[LogitsReport]
    reference_model: str = ""

    @property
    def ok(self) -> bool:
        return (self.round_trip is None or self.round_trip.ok) and (self.logits is None or self.logits.ok)

    def table(self) -> str:
        rows = []
        rt = self.round_trip
        if rt is not None:
            against = "" if rt.reference == "source" else " to the family's own trip through canonical (folded weights)"
            rows.append(("round-trip tensors", f"{rt.tensors_equal}/{rt.tensors_total} bit-identical{against}"
                         + (f"; missing {rt.missing[:3]}" if rt.missing else "")
                         + (f"; extra {rt.extra[:3]}" if rt.extra else "")
                         + (f"; differ {rt.mismatched[:3]}" if rt.mismatched else "")))
            rows.append(("config.json", "identical" if rt.config_equal else f"differs: {rt.config_diff}"))
            rows.append(("tokenizer/generation files", f"{rt.assets_equal}/{rt.assets_total} identical"))
        lg = self.logits
        if lg is not None:
            rows.append(("logits reference", self.reference_model))
            rows.append(("logits max abs diff", f"{lg.max_abs:.3e} (tolerance {lg.tolerance:.0e})"))
            rows.append(("logits mean abs diff", f"{lg.mean_abs:.3e}"))
            rows.append(("argmax agreement", f"{100.0 * lg.argmax_agree / lg.positions:.2f}% "
                                             f"({lg.argmax_agree}/{lg.positions})"))
        rows.append(("verdict", "PASS" if self.ok else "FAIL"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def verify(hf_dir: str, megatron_dir: str, *, tolerance: float = DEFAULT_TOLERANCE, seq_len: int = 16,
           batch: int = 2, round_trip: bool = True, logits: bool = True, progress: bool = False,
           allow_globals: Iterable[str] = ()) -> VerifyReport:
    """`allow_globals`: pickled globals ('MODULE.NAME') the user trusts beyond the allow-list, for every reader."""
    from megatron_bridge.convert import ConvertOptions, convert

    rt = None
    if round_trip:
        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            back = os.path.join(tmp, "hf")
            # legacy or torch_dist
            convert(megatron_dir, back, ConvertOptions(progress=progress, allow_globals=tuple(allow_globals)))
            rt = compare_hf_dirs(hf_dir, back, allow_globals)
            if rt.mismatched and not (rt.missing or rt.extra):
                # A folding family cannot come back bit-identical to its source, only to its own canonical trip.
                folded = compare_hf_dirs(family_round_trip(hf_dir, os.path.join(tmp, "family"), allow_globals), back)
                if folded.ok:
                    folded.reference = "family round trip"
                    rt = folded
    lg, ref_name = None, ""
    if logits:
        vocab = read_hf_config(hf_dir)["vocab_size"]
        tokens = probe_tokens(vocab, batch, seq_len)
        ref, ref_name = reference_logits(hf_dir, tokens, allow_globals)
        (res,) = run_mcore_jobs([{"checkpoint": os.path.abspath(megatron_dir), "task": "logits",
                                  "tokens": tokens.tolist(), "vocab_size": vocab}],
                                nproc=megatron_world_size(megatron_dir, allow_globals), policy=allow_globals,
                                progress=progress, desc="logits in megatron-core")
        lg = compare_logits(ref, res["logits"], tolerance)
    return VerifyReport(rt, lg, ref_name)
