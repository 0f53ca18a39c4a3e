"""Tensor dtypes by name, without torch: what a safetensors header or a torch pickle says a tensor holds.

`inspect` and the checks a reader runs before converting look at headers only; naming dtypes here (torch's names,
`bfloat16`, not torch's dtype objects) keeps them from importing torch. The converters turn a name into a torch
dtype with `getattr(torch, name)` when they move tensors.
"""
from __future__ import annotations

import struct
from typing import Optional

# safetensors dtype code -> (torch's dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def torch_name(code: str) -> str:
    """torch's name of a safetensors dtype code ('BF16' -> 'bfloat16')."""
    return SAFETENSORS_DTYPES[code][0]


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return SAFETENSORS_DTYPES[code][1]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def round_to_dtype(x: float, dtype: str) -> Optional[float]:
    """`float(torch.tensor(x, dtype=torch.float32).to(dtype))` without torch, for the floating dtypes a model is
    stored in (round to nearest even at each step, as torch rounds); None for another dtype (ask torch then)."""
    f = _f32(x)
    if dtype in ("float32", "float64"):
        return f
    if dtype == "float16":
        return struct.unpack("<e", struct.pack("<e", f))[0]
    if dtype == "bfloat16":  # the upper 16 bits of the float32, rounded to nearest even
        (bits,) = struct.unpack("<I", struct.pack("<f", f))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]
    return None
