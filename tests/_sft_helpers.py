"""Offline building blocks for the SFT and channel-loss tests: a tiny tokenizer, a tiny Llama, synthetic data.

Everything is made locally from fixed seeds, so the tests need no network and run in seconds on a CPU. The tokenizer
is a byte-level BPE trained on the synthetic corpus with the ChatML markers as special tokens and no chat template
(so the SFT code's ChatML fallback is what renders conversations).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]

WORDS = {
    "code": "def return for in range if else import class self print list dict len while yield lambda".split(),
    "math": "one two three four five plus minus times equals sum root prime square even odd half".split(),
    "chat": "hello thanks please sure sorry great weather today friend lunch music travel book idea".split(),
}


def sentence(rng: random.Random, channel: str, n_min: int, n_max: int) -> str:
    """A random run of the channel's words; channels differ in vocabulary so their losses differ."""
    return " ".join(rng.choice(WORDS[channel]) for _ in range(rng.randint(n_min, n_max)))


def chat_record(rng: random.Random, channel: str | None, turns: int = 1, n_min: int = 2, n_max: int = 6) -> dict:
    """A ``messages`` record with ``turns`` user/assistant exchanges."""
    topic = channel or "chat"
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng, topic, n_min, n_max)})
        messages.append({"role": "assistant", "content": sentence(rng, topic, n_min, n_max)})
    record = {"messages": messages}
    if channel is not None:
        record["channel"] = channel
    return record


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def build_tokenizer(out_dir: str):
    """Train a ~300-token byte-level BPE on the word lists and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(words) for words in WORDS.values()] * 20 + ["user assistant system\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random tiny LlamaForCausalLM saved in fp32 safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


def torchrun(args: list[str], nproc: int = 2, timeout: int = 180, cwd: str = REPO,
             module: str = "launch.sft") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m <module> ...`` (gloo on CPU; default launch.sft).

    A hang becomes a test failure: past ``timeout`` the whole process group (launcher and workers) is killed.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun hung for {timeout} s:\n{out[-4000:]}\n{err[-8000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{out[-4000:]}\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
