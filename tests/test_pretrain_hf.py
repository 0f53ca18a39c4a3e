"""Post-pretraining on the Trainer (launch/pretrain_hf.py): blocks that span channels, bad input before training,
2-process DDP with a resume whose per-channel curves equal an independent recomputation, and the smoke run."""
from __future__ import annotations

import json
import os
import time

import pytest

from _pretrain_hf_helpers import (
    CHANNELS,
    assert_windows_match,
    block_channel_sums,
    expected_windows,
    read_scalars,
    reference_blocks,
    torchrun,
    write_texts,
)
from _sft_helpers import build_model, build_tokenizer

WORLD, BATCH, ACCUM, STEPS, LOG_EVERY, BLOCK = 2, 1, 2, 4, 2, 32
BLOCKS_PER_STEP = WORLD * BATCH * ACCUM
EVAL_BLOCKS = 5  # odd: the last global eval batch is padded across the 2 ranks, and the padding must not count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_pt"))
    tok = build_tokenizer(root)
    build_model(root, len(tok), seed=4)
    return root, tok


def _texts(tmp, tok, blocks, seed, name):
    path = os.path.join(tmp, name)
    records = write_texts(path, tok, BLOCK, blocks, seed)
    return path, records


# ---------------------------------------------------------------- blocks

def test_blocks_equal_independent_concatenation(tiny, tmp_path):
    from launch.pretrain_hf_data import PackedBlocks, collate_blocks, scan_jsonl, tokenize_texts
    from patches.channel_loss import ChannelIndex

    _, tok = tiny
    path, records = _texts(str(tmp_path), tok, 12, seed=3, name="d.jsonl")
    report = scan_jsonl(path)
    index = ChannelIndex(report.channels)
    ds = PackedBlocks(tokenize_texts([report], tok, index, num_proc=2, cache_dir=str(tmp_path / "cache")), BLOCK)
    expected = reference_blocks(tok, records, BLOCK)
    assert len(ds) == len(expected) == 12
    total = sum(len(tok.encode(r["text"], add_special_tokens=False)) + 1 for r in records)
    assert ds.num_tokens == total and ds.dropped_tokens == total - 12 * BLOCK
    for i, (ids, channels) in enumerate(expected):
        assert ds[i]["input_ids"] == ids
        assert [index.names[c] for c in ds[i]["channel_ids"]] == channels
    assert sum(len(set(ch)) > 1 for _, ch in expected) >= 6, "test layout: blocks must span channels"
    counts = ds.channel_token_counts(index)
    assert counts == {name: sum(ch.count(name) for _, ch in expected) for name in index.names}
    batch = collate_blocks([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, BLOCK) and batch["labels"].equal(batch["input_ids"])


# ---------------------------------------------------------------- bad input, before training

def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a b"}', '{"text": "c", "channel": ["x"]}'], r"d.jsonl:2: field 'channel' is \['x'\]"),
    (['{"text": "a b"}', '{"text": "c", "channel": 1.5}'], r"d.jsonl:2: field 'channel' is 1.5 \(float\)"),
    (['{"text": "a b"}', "", '{oops'], r"d.jsonl:3: not valid JSON"),
    (['{"text": "a b"}', '["text"]'], r"d.jsonl:2: line is list, expected a JSON object"),
    (['{"content": "a b"}'], r"d.jsonl:1: record has keys \['content'\], no 'text'"),
    (['{"text": 7}'], r"d.jsonl:1: field 'text' is int 7; it must be a string"),
    (['{"text": ""}', '{"text": "  "}'], r"holds no non-empty text \(2 empty\)"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    from launch.pretrain_hf_data import scan_jsonl

    with pytest.raises(ValueError, match=message):
        scan_jsonl(_write(tmp_path / "d.jsonl", lines))


def test_empty_texts_are_counted_and_skipped(tiny, tmp_path):
    from launch.pretrain_hf_data import scan_jsonl, tokenize_texts
    from patches.channel_loss import ChannelIndex

    _, tok = tiny
    path = _write(tmp_path / "d.jsonl", ['{"text": "def return", "channel": "code"}', '{"text": ""}',
                                         '{"text": "one two"}', '{"text": " \\n "}', ""])
    report = scan_jsonl(path)
    assert (report.num_texts, report.num_empty, report.empty_lines) == (2, 2, [2, 4])
    assert "2 empty texts skipped (lines 2, 4)" in "\n".join(report.lines())
    tokenized = tokenize_texts([report], tok, ChannelIndex(report.channels), cache_dir=str(tmp_path / "c"))
    assert tokenized["length"] == [len(tok.encode(t, add_special_tokens=False)) + 1 for t in ("def return", "one two")]


def test_cli_refuses_bad_setups_before_training(tiny, tmp_path):
    import shutil

    from launch.pretrain_hf import main

    root, tok = tiny
    data, _ = _texts(str(tmp_path), tok, 2, seed=1, name="d.jsonl")
    base = ["--data", data, "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(ValueError, match=r"--block-size 1024 is above the model's 512 positions .*--block-size 512"):
        main(["--model", root, "--block-size", "1024"] + base)
    # A tokenizer without EOS: the message says what to pass, and --eos-token is checked against the vocabulary.
    no_eos = tmp_path / "no_eos"
    shutil.copytree(root, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has no EOS token.*pass --eos-token TOKEN"):
        main(["--model", str(no_eos), "--block-size", "32"] + base)
    with pytest.raises(ValueError, match=r"--eos-token 'nope' is not a token"):
        main(["--model", str(no_eos), "--block-size", "32", "--eos-token", "nope"] + base)
    with pytest.raises(ValueError, match=r"less than one block of --block-size 512"):
        main(["--model", root, "--block-size", "512"] + base)
    from launch.cli import main as cli

    assert cli(["pretrain_hf", "--model", root, "--block-size", "4096"] + base) == 2  # one line, no traceback
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---------------------------------------------------------------- 2-process DDP, resumed half way

@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    root, tok = tiny
    tmp = str(tmp_path_factory.mktemp("pt_ddp"))
    train, records = _texts(tmp, tok, STEPS * BLOCKS_PER_STEP, seed=7, name="train.jsonl")
    dev, dev_records = _texts(tmp, tok, EVAL_BLOCKS, seed=8, name="dev.jsonl")
    out = os.path.join(tmp, "out")
    args = ["--model", root, "--data", train, "--eval-data", dev, "--output-dir", out, "--block-size", str(BLOCK),
            "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--logging-steps", str(LOG_EVERY),
            "--save-steps", "1", "--eval-steps", str(LOG_EVERY), "--lr", "5e-3", "--no-shuffle",
            "--cache-dir", os.path.join(tmp, "cache"), "--preprocessing-num-workers", "2",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--save_total_limit", "10"]
    first = torchrun("launch.pretrain_hf", args + ["--max-steps", str(STEPS // 2)], nproc=WORLD)
    second = torchrun("launch.pretrain_hf", args + ["--max-steps", str(STEPS)], nproc=WORLD)
    return dict(root=root, tok=tok, out=out, records=records, dev_records=dev_records, logs=(first, second))


def test_ddp_channel_loss_across_a_resume_equals_recomputation(ddp_run):
    run = ddp_run
    blocks = reference_blocks(run["tok"], run["records"], BLOCK)
    assert any(len(set(ch)) == 3 for _, ch in blocks[:BLOCKS_PER_STEP * STEPS]), "test layout: 3-channel block"
    assert f"resuming from {os.path.join(run['out'], 'checkpoint-2')}" in run["logs"][1]
    scalars = read_scalars(run["out"])  # refuses a step written twice (a window counted twice)
    windows = expected_windows(run["out"], run["root"], blocks, BLOCKS_PER_STEP, STEPS, LOG_EVERY)
    assert sorted(windows) == [2, 4]
    assert_windows_match(scalars, windows)
    # No gap: both windows are in the curves, the second from the resumed run, whose step count went on to 4.
    assert sorted(scalars["channel_loss/code"]) == [2, 4]
    with open(os.path.join(run["out"], "checkpoint-4", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [2, 4]


def test_ddp_eval_channel_loss_equals_recomputation(ddp_run):
    run = ddp_run
    blocks = reference_blocks(run["tok"], run["dev_records"], BLOCK)
    assert len(blocks) == EVAL_BLOCKS
    scalars = read_scalars(run["out"])
    for step in (2, 4):
        sums = block_channel_sums(os.path.join(run["out"], f"checkpoint-{step}"), blocks)
        for name in CHANNELS:
            s, n = sums[name]
            assert abs(scalars[f"eval_channel_loss/{name}"][step] - s / n) <= 1e-5, (name, step)
            assert scalars[f"eval_channel_tokens/{name}"][step] == n  # padding rows of the last batch not counted


def test_ddp_run_reports_blocks_and_plots(ddp_run, tmp_path):
    from launch.plot_channel_loss import main as plot

    first = ddp_run["logs"][0]
    assert "blocks of 32;" in first and "tokens of the incomplete last block dropped" in first
    assert "model: " in first and " parameters, from " in first
    assert plot([ddp_run["out"], "--out", str(tmp_path / "c.png")]) == 0
    assert os.path.getsize(tmp_path / "c.png") > 10_000


# ---------------------------------------------------------------- smoke

def test_smoke_runs_end_to_end_and_reports(tiny, tmp_path, capsys):
    """From a config of our own model_type workbench (from scratch), on a slice, with a one-screen report; the wall
    time is printed, not asserted."""
    from transformers import AutoModelForCausalLM

    import checkpoint_tools.modeling_workbench  # noqa: F401  registers model_type workbench
    from checkpoint_tools.configuration_workbench import WorkbenchConfig
    from launch.pretrain_hf import main

    root, tok = tiny
    config = WorkbenchConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.save_pretrained(str(tmp_path / "cfg"))
    expected_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    data, records = _texts(str(tmp_path), tok, 40, seed=5, name="d.jsonl")
    out = tmp_path / "run"
    started = time.perf_counter()
    assert main(["--config", str(tmp_path / "cfg" / "config.json"), "--tokenizer", root, "--data", data,
                 "--output-dir", str(out), "--block-size", "32", "--smoke", "--smoke-texts", "30",
                 "--cache-dir", str(tmp_path / "c"), "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]) == 0
    seconds = time.perf_counter() - started
    text = capsys.readouterr().out
    print(f"smoke run: {seconds:.1f} s in process")
    assert "(smoke slice: the first texts only)" in text
    assert f"model: {expected_params:,} parameters, from scratch (workbench config" in text
    report = text[text.index("smoke run report"):]
    trained = reference_blocks(tok, records[:30], 32)[:4]
    for name in {c for _, channels in trained for c in channels[1:]}:
        assert f"\n{name} " in report
    assert "step time: " in report and "tokens/s" in report and "estimated from the slice's bytes per token" in report
    assert not (out / "checkpoint-1").exists() and (out / "smoke" / "runs").is_dir()
    logged = read_scalars(str(out / "smoke"))
    assert sorted(logged["train/loss"]) == [1, 2, 3, 4]


def test_tokenized_cache_is_reused_and_follows_the_file(tiny, tmp_path):
    """The second tokenization of the same file comes from the cache; a file rewritten in place is tokenized again."""
    from launch.pretrain_hf_data import scan_jsonl, tokenize_texts
    from patches.channel_loss import ChannelIndex

    _, tok = tiny
    path, cache = tmp_path / "d.jsonl", str(tmp_path / "cache")
    index = ChannelIndex(["code", "math"])

    def tokenized(lines):
        report = scan_jsonl(_write(path, lines))
        return tokenize_texts([report], tok, index, cache_dir=cache)

    first = tokenized(['{"text": "def return", "channel": "code"}'])
    again = tokenized(['{"text": "def return", "channel": "code"}'])
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in first.cache_files]
    changed = tokenized(['{"text": "one two three four", "channel": "math"}'])
    assert changed["length"] == [len(tok.encode("one two three four", add_special_tokens=False)) + 1]
    assert changed["channel_id"] == [index.id("math")]
