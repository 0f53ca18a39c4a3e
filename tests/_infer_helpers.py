"""Shared by the multi-replica inference tests: a tiny model with a real (trained) byte-level BPE tokenizer and a chat
template, JSONL writers, and the reference every run is held to: single-process `generate()`, one item at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
WORDS = "the quick brown fox jumps over the lazy dog while hello world asks what is the capital of france".split()


def make_tiny_model(path: str, head_dim: int = 16) -> str:
    """A random Llama (vocab 320) with a byte-level BPE tokenizer trained here (259 tokens) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_llama

    make_llama(path, vocab_size=320, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
               head_dim=head_dim, max_position_embeddings=512)
    os.remove(os.path.join(path, "tokenizer_config.json"))  # conftest's stand-in; a real tokenizer goes here
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def prompts(n: int, seed: int = 0) -> list[dict]:
    """n lines of varied length (so batches need padding), every fifth a chat, ids on some lines only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (1 + int(torch.randint(12, (1,), generator=g)),),
                                                      generator=g)]
        text = " ".join(words)
        row = {"messages": [{"role": "user", "content": text}]} if i % 5 == 4 else {"prompt": text}
        if i % 3 == 0:
            row["id"] = f"q{i}"
        out.append(row)
    return out


def write_jsonl(path: str, rows: list, raw_lines: dict | None = None) -> str:
    """Rows as JSON lines; raw_lines {position: text} inserts lines verbatim (malformed input)."""
    lines = [json.dumps(r) for r in rows]
    for pos, text in sorted((raw_lines or {}).items()):
        lines.insert(pos, text)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def reference(model_dir: str, rows: list[dict], max_new_tokens: int) -> list[dict]:
    """What the user compares with: the model's own generate(), greedily, one item at a time, in a single process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for i, row in enumerate(rows):
        if "messages" in row:
            enc = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
            ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        else:
            ids = tok(row["prompt"])["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()
        cut = next((j + 1 for j, t in enumerate(gen) if t in eos), len(gen))
        out.append({"id": row.get("id", i), "output": tok.decode(gen[:cut], skip_special_tokens=True),
                    "prompt_tokens": len(ids), "output_tokens": cut})
    return out


def launch(args: list[str], python: str = sys.executable, env_extra: dict | None = None) -> subprocess.Popen:
    """`python -m launch ...` from the repository, in its own session (so a test can kill the whole run)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([python, "-m", "launch", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
