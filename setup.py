"""Megatron Workbench: checkpoint conversion, verification and training tools around Megatron-LM and HF."""
from setuptools import find_packages, setup

setup(
    name="megatron-workbench",
    version="0.1.0",
    description="Checkpoint conversion (HF families <-> canonical <-> Megatron), verification, channel loss, launch tools",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_bridge*", "checkpoint_tools*", "patches*", "launch*"]),
    # The shipped DeepSpeed config (launch.sft --deepspeed zero2) is data, not a module.
    package_data={"launch": ["configs/*.json"]},
    # torch is deliberately not listed with a loose range: `make install` pins the CPU build first, and a
    # bare `torch` requirement would let pip pull a multi-GB CUDA build on a CPU-only machine.
    install_requires=[
        "torch>=2.4",
        # 0.16 on Python 3.11 (the default install); 0.17-0.19 need Python >= 3.12 and write torch_dist
        # checkpoints without common.pt, which torch_dist_format reads as well.
        "megatron-core>=0.16,<0.20",
        "transformers>=4.46",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "isal",  # CRC-32 of rank files at ~10 GB/s a core (zlib's ~3.4); checkpoint_tools.crc32 falls back to zlib
        "tensorboard",
        "matplotlib",
        "einops",
    ],
    extras_require={
        "demo": ["gguf", "accelerate", "sentencepiece"],
        # DeepSpeed is exercised on CPU in the tests (ZeRO-2/3 under torchrun); datasets tokenizes pretraining text.
        "test": ["pytest", "gguf", "accelerate", "sentencepiece", "peft", "datasets", "deepspeed>=0.19.8"],
        "sft": ["datasets", "peft"],
        "deepspeed": ["deepspeed>=0.19.8"],
        "gpu": ["transformer-engine", "apex", "flash-attn"],
        "vllm": ["vllm"],
    },
    entry_points={"console_scripts": ["workbench=launch.cli:main"]},
)
