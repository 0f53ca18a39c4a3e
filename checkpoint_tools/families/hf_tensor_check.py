"""Matching the tensors an HF checkpoint holds against those its config implies (through a family's links), so a
reader fails listing every missing, unknown or misshapen tensor before it converts anything. Shapes alone (the
links' `canonical_shapes`): a header is enough, and `inspect` runs the same check without torch."""
from __future__ import annotations

from checkpoint_tools.canonical import CanonicalConfig, expected_shapes
from checkpoint_tools.families.mappings import Link


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
            try:
                got = [tuple(s) for s in link.canonical_shapes([tuple(present[h]) for h in link.hf])]
            except ValueError as e:
                got = [str(e)]
            if got != [shapes[c] for c in link.canonical]:
                bad.append(f"{list(link.hf)}: {[present[h] for h in link.hf]} does not give "
                           f"{[shapes[c] for c in link.canonical]}")
        if bad:
            problems.append(f"shape mismatches ({len(bad)}): {bad[:20]}")
    return problems
