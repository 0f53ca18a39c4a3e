"""SFT pieces on one process: data formats and bad input, assistant-only labels, packing, the Trainer's loss with
channel loss on equal to stock transformers, and the command line (LoRA, resume, truncation report, DeepSpeed)."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from _sft_helpers import build_model, build_tokenizer, chat_record, write_jsonl
from launch.sft_data import (
    CHATML_TEMPLATE,
    Conversation,
    ensure_chat_template,
    load_jsonl,
    tokenize_conversation,
    tokenize_dataset,
)
from launch.sft_packing import SFTCollator, SFTDataset, next_fit_pack
from patches.channel_loss import build_index


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_sft"))
    tok = build_tokenizer(root)
    build_model(root, len(tok), seed=3)
    ensure_chat_template(tok)
    return root, tok


# ---------------------------------------------------------------- data formats and bad input

def test_three_formats_and_channels(tmp_path):
    path = write_jsonl(str(tmp_path / "d.jsonl"), [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}], "channel": "chat"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "channel": 7},
        {"instruction": "do", "input": "this", "output": "done"},
    ])
    convs = load_jsonl(path)
    assert [c.channel for c in convs] == ["chat", "7", None]
    assert convs[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert convs[2].messages == [{"role": "user", "content": "do\n\nthis"}, {"role": "assistant", "content": "done"}]
    assert convs[2].where == f"{path}:3"


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}]}, r"d.jsonl:2: sample has no usable turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"d.jsonl:2: sample has no usable turns"),
    ({"messages": []}, r"d.jsonl:2: sample has no usable turns"),
    ({"messages": [{"role": "narrator", "content": "q"}]}, r"d.jsonl:2: turn 0 has unknown role 'narrator'"),
    ({"conversations": [{"from": "bot", "value": "q"}]}, r"d.jsonl:2: turn 0 has unknown role 'bot'"),
    ({"text": "plain"}, r"d.jsonl:2: record has keys \['text'\]"),
    ({"instruction": "q", "output": "a", "channel": ["x"]}, r"d.jsonl:2: field 'channel' is \['x'\]"),
])
def test_bad_records_name_their_line(tmp_path, record, message):
    good = {"instruction": "q", "output": "a"}
    path = write_jsonl(str(tmp_path / "d.jsonl"), [good, record])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_bad_json_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        load_jsonl(str(path))


# ---------------------------------------------------------------- labels on assistant turns only

def _supervised_text(tok, sample):
    return tok.decode([t for t in sample.labels if t != -100])


def test_labels_cover_assistant_turns_only(tiny):
    _, tok = tiny
    conv = Conversation([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "sure thanks"},
        {"role": "user", "content": "one plus two"},
        {"role": "assistant", "content": "three"},
    ], "chat", "x:1")
    sample = tokenize_conversation(tok, conv, 512)
    assert tok.decode(sample.input_ids) == tok.apply_chat_template(conv.messages, tokenize=False)
    assert _supervised_text(tok, sample) == "sure thanks<|im_end|>\nthree<|im_end|>\n"
    # A tokenizer without offsets (slow) takes the span-by-span path and must agree.

    class Slow:
        is_fast = False

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            return self.inner(text, **kw)

        def apply_chat_template(self, *a, **kw):
            return self.inner.apply_chat_template(*a, **kw)

    slow = tokenize_conversation(Slow(tok), conv, 512)
    assert (slow.input_ids, slow.labels) == (sample.input_ids, sample.labels)


def test_other_templates_work_and_rewriting_ones_are_refused(tiny):
    _, tok = tiny
    saved = tok.chat_template
    try:
        tok.chat_template = (
            "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %} </s>"
            "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
        )
        conv = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello friend"}],
                            None, "x:1")
        assert _supervised_text(tok, tokenize_conversation(tok, conv, 512)) == "hello friend </s>\n"
        # A template that marks the last turn differently cannot be split into turns honestly.
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
        with pytest.raises(ValueError, match="x:1: the chat template renders turn 1 differently"):
            tokenize_conversation(tok, conv, 512)
    finally:
        tok.chat_template = saved


def test_chatml_only_when_there_is_no_template(tiny):
    _, tok = tiny
    assert tok.chat_template == CHATML_TEMPLATE and ensure_chat_template(tok) is False


def test_long_samples_are_truncated_and_counted(tiny):
    _, tok = tiny
    rng = random.Random(0)
    convs = [Conversation(chat_record(rng, "code", n_min=2, n_max=3)["messages"], "code", f"x:{i}") for i in range(3)]
    convs.append(Conversation(chat_record(rng, "math", turns=6)["messages"], "math", "x:4"))
    convs.append(Conversation([{"role": "user", "content": "one " * 80}, {"role": "assistant", "content": "two"}],
                              None, "x:5"))
    samples, report = tokenize_dataset(tok, convs, 64, "x")
    assert len(samples) == 5 and all(len(s.input_ids) <= 64 for s in samples)
    assert [s.truncated for s in samples] == [False, False, False, True, True]
    assert report.num_truncated == 2 and report.num_without_labels == 1
    text = "\n".join(report.lines())
    assert "2 samples longer than max_length=64 tokens were truncated" in text
    assert "1 samples have no assistant token left" in text and "channel 'default': 1 samples" in text


# ---------------------------------------------------------------- packing

def test_next_fit_keeps_order():
    assert next_fit_pack([3, 4, 2, 6, 1, 1], 8) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="over max_length=8"):
        next_fit_pack([9], 8)


def test_packed_rows_attend_within_samples_only(tiny):
    """Each sub-sample's logits in a packed row equal the sample run alone: no attention across the boundary."""
    from transformers import LlamaForCausalLM

    root, tok = tiny
    rng = random.Random(5)
    convs = [Conversation(chat_record(rng, c)["messages"], c, f"x:{i}") for i, c in enumerate(["code", "math", "chat"])]
    samples, _ = tokenize_dataset(tok, convs, 256, "x")
    index = build_index([s.channel for s in samples])
    ds = SFTDataset(samples, index, max_length=256, packing=True)
    assert ds.rows == [[0, 1, 2]]
    batch = SFTCollator(tok.pad_token_id, packing=True)([ds[0]])
    assert "attention_mask" not in batch
    model = LlamaForCausalLM.from_pretrained(root).eval()
    with torch.no_grad():
        # As the Trainer runs it (use_cache=False): transformers detects packing from position_ids only without a cache.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for k, s in enumerate(samples):
            n = len(s.input_ids)
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            # Per token: the sample's channel, and no label on the first token (it would be predicted across).
            assert batch["channel_ids"][0, start:start + n].tolist() == [index.id(s.channel)] * n
            assert batch["sample_ids"][0, start:start + n].tolist() == [k] * n
            assert batch["labels"][0, start] == -100
            start += n


def test_collator_pads_with_ignored_labels(tiny):
    _, tok = tiny
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2], "channel_ids": [1, 1, 1],
             "sample_ids": [0, 0, 0]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0], "channel_ids": [0], "sample_ids": [0]}]
    batch = SFTCollator(tok.pad_token_id, packing=False, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].shape == (2, 4) and "position_ids" not in batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100] * 4
    assert batch["channel_ids"][1].tolist() == [0, -1, -1, -1]
    assert batch["sample_ids"][:, 0].tolist() == [0, 1]  # unique across the batch


# ---------------------------------------------------------------- the Trainer: same loss and updates as stock

def _train(root, tok, tmp, channel_loss: bool, mode: str = "token", steps: int = 3):
    from transformers import LlamaForCausalLM, TrainingArguments

    from patches.hf_trainer_channel_loss import ChannelLossTrainer

    rng = random.Random(11)
    convs = [Conversation(chat_record(rng, c, turns=2)["messages"], c, f"x:{i}")
             for i, c in enumerate(["code", "math", "chat"] * 4)]
    samples, _ = tokenize_dataset(tok, convs, 128, "x")
    index = build_index([s.channel for s in samples])
    args = TrainingArguments(
        output_dir=tmp, max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = ChannelLossTrainer(
        model=LlamaForCausalLM.from_pretrained(root), args=args,
        train_dataset=SFTDataset(samples, index, 128, packing=False),
        data_collator=SFTCollator(tok.pad_token_id, packing=False),
        channel_index=index if channel_loss else None,
        channel_loss_mode=mode,
    )
    trainer.train()
    return trainer, samples


def test_channel_loss_trains_exactly_like_stock_transformers(tiny, tmp_path):
    root, tok = tiny
    on, _ = _train(root, tok, str(tmp_path / "on"), channel_loss=True)
    off, _ = _train(root, tok, str(tmp_path / "off"), channel_loss=False)
    losses_on = [h["loss"] for h in on.state.log_history if "loss" in h]
    losses_off = [h["loss"] for h in off.state.log_history if "loss" in h]
    assert losses_on == pytest.approx(losses_off, rel=1e-6, abs=1e-6)
    for (name, a), (_, b) in zip(on.model.named_parameters(), off.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert all("channel_loss/code" in h for h in on.state.log_history if "loss" in h)
    assert not any(k.startswith("channel_") for h in off.state.log_history for k in h)


def test_sample_mode_is_the_mean_of_per_sample_means(tiny, tmp_path):
    """Step 1 (initial weights, first 4 samples in order): recomputed by hand, sample by sample."""
    from transformers import LlamaForCausalLM

    root, tok = tiny
    trainer, samples = _train(root, tok, str(tmp_path / "s"), channel_loss=True, mode="sample", steps=1)
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    model = LlamaForCausalLM.from_pretrained(root).eval()
    means = {}
    with torch.no_grad():
        for s in samples[:4]:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1].double()
            target = torch.tensor(s.labels[1:])
            keep = target != -100
            means.setdefault(s.channel, []).append(
                torch.nn.functional.cross_entropy(logits[keep], target[keep]).item())
    for name, values in means.items():
        assert logged[f"channel_samples/{name}"] == len(values)
        assert logged[f"channel_loss/{name}"] == pytest.approx(sum(values) / len(values), abs=1e-5)


# ---------------------------------------------------------------- the command line

def _cli_data(tmp):
    rng = random.Random(2)
    records = [chat_record(rng, c) for c in ["code", "math", "chat"] * 4]
    records.append({"messages": [{"role": "user", "content": "one " * 100}, {"role": "assistant", "content": "two"}],
                    "channel": "math"})
    return write_jsonl(os.path.join(tmp, "train.jsonl"), records)


def test_cli_lora_resume_and_start_up_report(tiny, tmp_path, capsys):
    from launch.plot_channel_loss import read_curves
    from launch.sft import main

    root, _ = tiny
    data = _cli_data(str(tmp_path))
    out = str(tmp_path / "run")
    common = ["--model", root, "--data", data, "--output-dir", out, "--max-length", "96", "--batch-size", "2",
              "--lora", "--lora-r", "4", "--lr", "1e-3", "--logging-steps", "1", "--save-steps", "2",
              "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    assert main(common + ["--max-steps", "2"]) == 0
    first = capsys.readouterr().out
    assert "1 samples longer than max_length=96 tokens were truncated" in first
    assert "tokenizer has no chat template: using ChatML" in first
    assert "channel loss: on; channels ['chat', 'code', 'math']" in first
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))

    assert main(common + ["--max-steps", "3"]) == 0
    second = capsys.readouterr().out
    assert f"resuming from {os.path.join(out, 'checkpoint-2')}" in second
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 2
    # Both runs' event files are read and merged: steps 1-2 from the first, step 3 from the resumed one.
    curves = read_curves(out)["train"]
    assert sorted({step for steps, _ in curves.values() for step in steps}) == [1, 2, 3]
    assert all(v > 0 for _, values in curves.values() for v in values)


def test_cli_refuses_what_it_cannot_do(tiny, tmp_path):
    from launch.sft import main

    root, _ = tiny
    data = _cli_data(str(tmp_path))
    base = ["--model", root, "--data", data, "--output-dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--deepspeed 'zero9' is neither a file nor one of"):
        main(base + ["--deepspeed", "zero9"])
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the deepspeed package"):
            main(base + ["--deepspeed", "zero2"])
    with pytest.raises(SystemExit, match="unknown option --warmup-ratio"):
        main(base + ["--warmup-ratio", "0.1"])


def test_shipped_zero2_config():
    from launch.sft import DEEPSPEED_PRESETS

    with open(DEEPSPEED_PRESETS["zero2"]) as f:
        config = json.load(f)
    assert config["zero_optimization"]["stage"] == 2
    # "auto" lets the Trainer fill batch sizes, accumulation and clipping from its own arguments.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
