"""Shared fixtures: tiny random Hugging Face Llama checkpoints written by `transformers` itself."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_llama(path: str, seed: int = 0, dtype=torch.float32, **overrides) -> str:
    """Save a random LlamaForCausalLM with non-trivial norms and biases (so a swapped tensor changes logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(path)
    # A tokenizer-like asset so the carry-over of tokenizer files is checked too.
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 128, "note": "tiny test tokenizer"}\n')
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    return make_llama(str(tmp_path / "hf"))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")
