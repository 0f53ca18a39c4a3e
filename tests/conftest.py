"""Shared fixtures: tiny random Hugging Face Llama checkpoints written by `transformers` itself."""
from __future__ import annotations

import os
import re
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


# Warnings a command-line test accepts on stderr, each with the reason it is expected. A user runs the commands
# with no warning filters, so the tests do too (`cli_env`); any other line that mentions a warning (a Python
# `...Warning:` or a logged `WARNING`) is first-use noise a user would see, and fails the test.
EXPECTED_CLI_WARNINGS: tuple[str, ...] = (
    # `inspect`, `convert` and `verify` themselves print none on these tiny checkpoints. Only `make convert` on a
    # checkout without `.installed` runs its install step first, and pip warns when run as root (not our code).
    r"^WARNING: Running pip as the 'root' user",
)


def cli_env(**extra: str) -> dict:
    """The environment a user runs the command line in: ours, minus any warning filter the test runner has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(extra)
    return env


def assert_no_unexpected_warnings(stderr: str, expected: tuple[str, ...] = ()) -> None:
    """Fail listing every stderr line that mentions a warning and matches no pattern (regex) of
    EXPECTED_CLI_WARNINGS or `expected` (the warnings a test provokes on purpose, with a comment saying why)."""
    allowed = [re.compile(p) for p in (*EXPECTED_CLI_WARNINGS, *expected)]
    unexpected = [line for line in stderr.splitlines()
                  if re.search(r"warning", line, re.IGNORECASE) and not any(p.search(line) for p in allowed)]
    assert not unexpected, "unexpected warnings on stderr:\n" + "\n".join(unexpected)
