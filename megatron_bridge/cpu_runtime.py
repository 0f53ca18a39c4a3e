"""Run stock megatron-core on a CPU-only torch (gloo for TP/PP/DP); a no-op wherever CUDA exists.

megatron-core 0.16 assumes CUDA in a few places (seen with torch 2.13 CPU):
  - `device="cuda"` literals: default causal masks, pipeline schedules, p2p shape exchange;
  - `torch.cuda.current_device()` as a device in rotary embeddings;
  - `Tensor.cuda()` when tied embeddings are set up across pipeline stages;
  - the CUDA RNG tracker (`model_parallel_cuda_manual_seed`, `_get/_set_cuda_rng_state`);
  - `assert param.grad.type() == 'torch.cuda.FloatTensor'` in the optimizer's gradient clipping (training).
`enable()` routes each to the CPU: a TorchFunctionMode rewrites cuda devices to cpu for the whole process (torch
function modes are thread-local state, entered once on the main thread). Verification, tests and users without a
GPU use it; it never changes behaviour on a machine with CUDA.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrite every `device=cuda...` argument to cpu and make `Tensor.cuda()` the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Type names as megatron-core's optimizer asserts them ('torch.cuda.FloatTensor').
            name = func(*args)
            return "torch.cuda." + name[len("torch."):] if name.startswith("torch.") and ".cuda." not in name else name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def enable() -> bool:
    """Install the CPU redirections once per process. Returns True when they are active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    _CudaToCpu().__enter__()  # left open on purpose: the whole process runs on the CPU
    _enabled = True
    return True


def seed(value: int = 1234) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker (on the CPU RNG when there is no CUDA)."""
    torch.manual_seed(value)
    import megatron.core.tensor_parallel.random as mrandom
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(value)
        return
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.states_["model-parallel-rng"] = torch.get_rng_state()
    tracker.seeds_.add(value + 2718)
