"""A conversion as a plan: (source format, target, layout change, names, dtype) -> an ordered list of steps.

The plan is computed once, from the detected source format and the options alone (no file is read), then run by
`megatron_bridge.convert`. `--dry-run` prints it. Every step is one of a few primitive conversions, each of which
reads one folder and writes one folder:

    hf_to_legacy           HF family folder            -> Megatron legacy at TP x PP (x VPP)
    hf_to_family           HF family folder            -> HF folder of another family (through canonical)
    legacy_to_hf           Megatron legacy             -> HF folder of the recorded (or chosen) family
    legacy_to_legacy       Megatron legacy             -> Megatron legacy at another layout / names / dtype
    hf_to_torch_dist       HF family folder            -> torch_dist recording TP x PP (x VPP) in its args
    torch_dist_to_hf       torch_dist                  -> HF folder of the recorded (or chosen) family
    legacy_to_torch_dist   Megatron legacy             -> torch_dist at any layout
    torch_dist_to_legacy   torch_dist                  -> Megatron legacy at any layout / names / dtype
    torch_dist_to_torch_dist  torch_dist               -> torch_dist at another layout / dtype

torch_dist is read and written in one process by streaming its global, layout-free tensors
(megatron_bridge.torch_dist_reader / torch_dist_writer); megatron-core reshards it at load.

A plan with more than one step stages its intermediate folders in a scratch folder beside the destination.

Which flag means what, and where its default comes from, lives here and nowhere else:
  - `--tp/--pp/--vpp/--names/--make-vocab-size-divisible-by/--format` describe Megatron output; on a Megatron
    source any of them means "write Megatron", without them the output is Hugging Face.
  - Unset layout flags default to the source's layout on a Megatron source (TP, PP, VPP, divisible-by), and to
    TP=PP=VPP=1, local names, 128 on a Hugging Face source.
  - A flag that does not apply to the chosen direction is refused, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

HF, LEGACY, TORCH_DIST = "hf", "megatron_legacy", "megatron_torch_dist"
SOURCE, DESTINATION = "source", "destination"

# The one place for defaults of options that may also come from a Megatron source.
DEFAULTS = {"vpp": 1, "name_style": "local", "make_vocab_size_divisible_by": 128, "max_shard_bytes": 2 * 1024**3}

# Options that describe Megatron output (CLI spelling for messages).
MEGATRON_LAYOUT_FLAGS = {"tp": "--tp", "pp": "--pp", "vpp": "--vpp", "name_style": "--names",
                         "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by", "format": "--format"}


@dataclass
class ConvertOptions:
    """What the user asked for. `None` means "not given": the plan fills it from the source or from DEFAULTS."""
    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None
    name_style: Optional[str] = None
    make_vocab_size_divisible_by: Optional[int] = None
    dtype: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    max_shard_bytes: Optional[int] = None
    # Megatron output format: "legacy" (mp_rank_* torch pickles) or "torch_dist".
    format: Optional[str] = None
    force: bool = False
    progress: bool = True
    allow_globals: Iterable[str] = field(default_factory=tuple)

    def value(self, name: str):
        """The option, or its default when not given."""
        given = getattr(self, name)
        return DEFAULTS[name] if given is None else given

    def given(self, *names: str) -> list[str]:
        return [n for n in names if getattr(self, n) is not None]

    def layout_given(self) -> bool:
        return bool(self.given(*MEGATRON_LAYOUT_FLAGS))


@dataclass(frozen=True)
class Step:
    """One primitive conversion: `action` reads `src` and writes `dst` ("source", "destination" or a stage name)
    with the plan's options changed by `changes` (e.g. a staged legacy copy always uses local names)."""
    action: str
    src: str
    dst: str
    changes: tuple = ()

    def options(self, opts: ConvertOptions) -> ConvertOptions:
        return replace(opts, **dict(self.changes))

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.changes)
        return f"{self.action}: {self.src} -> {self.dst}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class Plan:
    summary: str          # "hf -> megatron torch_dist", "megatron legacy -> qwen2", ...
    steps: tuple
    target_family: Optional[str] = None  # for legacy_to_hf / hf_to_family

    def describe(self) -> str:
        lines = [f"plan: {self.summary}"]
        lines += [f"  {i + 1}. {s.describe()}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


def _refuse(opts: ConvertOptions, names: dict, why: str) -> None:
    bad = [flag for attr, flag in names.items() if getattr(opts, attr) is not None]
    if bad:
        raise ValueError(f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not apply: {why}")


def plan_conversion(src_format: str, opts: ConvertOptions, target_family: Optional[str] = None,
                    megatron_target: bool = False) -> Plan:
    """The steps that turn a `src_format` folder into what the options ask for.

    `target_family` is a family model_type for Hugging Face output; `megatron_target` is True when the user named
    Megatron as the target (`--to megatron`, `trans_X_to_megatron`)."""
    if opts.format not in (None, "legacy", "torch_dist"):
        raise ValueError(f"--format {opts.format!r}: use legacy or torch_dist")
    if opts.name_style not in (None, "local", "te"):
        raise ValueError(f"--names {opts.name_style!r}: use local or te")
    if src_format == HF:
        _refuse(opts, {"vocab_size": "--vocab-size"}, "a Hugging Face source records its vocab size")
        if target_family is not None:
            _refuse(opts, MEGATRON_LAYOUT_FLAGS, f"--to {target_family} writes a Hugging Face checkpoint")
            return Plan(f"hf -> {target_family}", (Step("hf_to_family", SOURCE, DESTINATION),), target_family)
        _refuse(opts, {"max_shard_bytes": "--max-shard-size"}, "it sizes Hugging Face output shards")
        if opts.format == "torch_dist":
            if opts.name_style == "te":
                raise ValueError("--names te: torch_dist keys are name-style free (megatron-core maps them at load);"
                                 " drop --names")
            return Plan("hf -> megatron torch_dist", (Step("hf_to_torch_dist", SOURCE, DESTINATION),))
        return Plan("hf -> megatron", (Step("hf_to_legacy", SOURCE, DESTINATION),))

    kind = "torch_dist" if src_format == TORCH_DIST else "legacy"
    to_megatron = megatron_target or opts.layout_given()
    if not to_megatron:  # Megatron -> Hugging Face
        what = f"megatron {kind} -> {target_family or 'hf'}"
        if src_format == LEGACY:
            return Plan(what, (Step("legacy_to_hf", SOURCE, DESTINATION),), target_family)
        return Plan(what, (Step("torch_dist_to_hf", SOURCE, DESTINATION),), target_family)

    if target_family is not None:
        given = [MEGATRON_LAYOUT_FLAGS[n] for n in opts.given(*MEGATRON_LAYOUT_FLAGS)]
        raise ValueError(f"{', '.join(given) or '--to megatron'} ask for Megatron output, --to {target_family} for "
                         f"a Hugging Face checkpoint; drop one")
    _refuse(opts, {"max_shard_bytes": "--max-shard-size"}, "it sizes Hugging Face output shards")
    _refuse(opts, {"tokenizer": "--tokenizer"}, "tokenizer files travel from a Megatron source as they are; pass "
                                                "--tokenizer when converting to Hugging Face")
    out = opts.format or kind
    what = f"megatron {kind} -> megatron {out}"
    if out == "torch_dist" and opts.name_style == "te":
        raise ValueError("--names te: torch_dist keys are name-style free (megatron-core maps them at load); "
                         "drop --names")
    # Every Megatron -> Megatron step reads any layout and writes any layout, names and dtype in one pass: torch_dist
    # is read and written by streaming its global tensors (megatron-core reshards it at load).
    action = {("legacy", "legacy"): "legacy_to_legacy", ("legacy", "torch_dist"): "legacy_to_torch_dist",
              ("torch_dist", "legacy"): "torch_dist_to_legacy",
              ("torch_dist", "torch_dist"): "torch_dist_to_torch_dist"}
    return Plan(what, (Step(action[(kind, out)], SOURCE, DESTINATION),))


__all__ = ["ConvertOptions", "Plan", "Step", "plan_conversion", "DEFAULTS", "HF", "LEGACY", "TORCH_DIST"]
