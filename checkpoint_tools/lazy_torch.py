"""`torch`, imported the first time one of its attributes is used.

Reading a checkpoint's headers (`inspect`, format detection, a family's config and shape checks) needs no tensor,
yet the modules that hold those readers also hold the code that moves tensors. They name torch through this proxy
instead of `import torch` at the top, so importing them costs nothing until a tensor is touched (the torch import
alone is about 2.5 s of CPU). Only attribute access is proxied: `torch.float32`, `torch.cat(...)`,
`isinstance(x, torch.Tensor)`; annotations stay strings (`from __future__ import annotations`).
"""
from __future__ import annotations

from typing import Any


class _LazyTorch:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import torch  # a dictionary lookup once torch is loaded

        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch, imported at first use>"


torch: Any = _LazyTorch()
