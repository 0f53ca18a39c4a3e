"""DeepSpeed exercised on CPU (its CPU accelerator, 2 processes under torchrun, gloo): the shipped ZeRO-2 and ZeRO-3
configs for pretraining and SFT (LoRA with ZeRO-2), with per-channel losses read back from the event files equal to an
independent recomputation from the same blocks and model states, exactly as under DDP."""
from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install -e .[deepspeed]")

from _pretrain_hf_helpers import (  # noqa: E402
    assert_windows_match,
    expected_windows,
    read_scalars,
    reference_blocks,
    torchrun,
    write_texts,
)
from _sft_helpers import build_model, build_tokenizer, chat_record, write_jsonl  # noqa: E402

WORLD, BATCH, ACCUM, STEPS, LOG_EVERY, BLOCK = 2, 1, 2, 4, 2, 32
BLOCKS_PER_STEP = WORLD * BATCH * ACCUM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_ds"))
    tok = build_tokenizer(root)
    build_model(root, len(tok), seed=6)
    return root, tok


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def pretrain_run(request, tiny, tmp_path_factory):
    root, tok = tiny
    tmp = str(tmp_path_factory.mktemp(f"pt_{request.param}"))
    train = os.path.join(tmp, "train.jsonl")
    records = write_texts(train, tok, BLOCK, STEPS * BLOCKS_PER_STEP, seed=11)
    out = os.path.join(tmp, "out")
    log = torchrun("launch.pretrain_hf", [
        "--model", root, "--data", train, "--output-dir", out, "--block-size", str(BLOCK),
        "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--logging-steps", str(LOG_EVERY),
        "--save-steps", "1", "--max-steps", str(STEPS), "--lr", "5e-3", "--no-shuffle", "--deepspeed", request.param,
        "--cache-dir", os.path.join(tmp, "cache"), "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ], nproc=WORLD)
    return dict(stage=request.param, root=root, tok=tok, out=out, records=records, log=log)


def test_pretrain_channel_loss_under_deepspeed_equals_recomputation(pretrain_run):
    run = pretrain_run
    # DeepSpeed really ran: its engine wrote its own checkpoint (partitioned optimizer state) next to the weights.
    assert os.path.isdir(os.path.join(run["out"], "checkpoint-2", "global_step2"))
    blocks = reference_blocks(run["tok"], run["records"], BLOCK)
    windows = expected_windows(run["out"], run["root"], blocks, BLOCKS_PER_STEP, STEPS, LOG_EVERY)
    assert_windows_match(read_scalars(run["out"]), windows)


# ---------------------------------------------------------------- SFT: LoRA with ZeRO-2, full weights with ZeRO-3

@pytest.fixture(scope="module", params=[("zero2", True), ("zero3", False)], ids=["lora-zero2", "full-zero3"])
def sft_run(request, tiny, tmp_path_factory):
    from test_channel_loss_ddp import make_sample

    stage, lora = request.param
    root, tok = tiny
    tmp = str(tmp_path_factory.mktemp(f"sft_{stage}"))
    rng = random.Random(21)
    # Step 1 reads the first 4 records (2 ranks x batch 2), step 2 the next 4; math sits in one row of step 1.
    channels = ["code", "math", "chat", "code", "chat", "code", "math", "chat"]
    records = [make_sample(rng, tok, c, 20, 60) for c in channels]
    data = write_jsonl(os.path.join(tmp, "train.jsonl"), records)
    out = os.path.join(tmp, "out")
    args = ["--model", root, "--data", data, "--output-dir", out, "--max-length", "128", "--batch-size", "2",
            "--max-steps", "2", "--logging-steps", "1", "--save-steps", "1", "--lr", "5e-3", "--no-shuffle",
            "--channel-loss", "on", "--deepspeed", stage, "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    if lora:
        args += ["--lora", "--lora-r", "4", "--lora-dropout", "0"]
    log = torchrun("launch.sft", args, nproc=WORLD)
    return dict(stage=stage, lora=lora, root=root, tok=tok, out=out, records=records, log=log)


def test_sft_under_deepspeed_channel_loss_equals_recomputation(sft_run):
    from test_channel_loss_ddp import channel_sums

    run = sft_run
    scalars = read_scalars(run["out"])
    # Step 1 runs the initial weights (LoRA's B starts at zero, so the adapted model is the base model).
    states = {1: run["root"]}
    if not run["lora"]:
        states[2] = os.path.join(run["out"], "checkpoint-1")  # ZeRO-3 gathered the full weights on save
    for step, state in states.items():
        sums = channel_sums(state, run["tok"], run["records"][(step - 1) * 4: step * 4])
        for name, (s, n) in sums.items():
            assert abs(scalars[f"channel_loss/{name}"][step] - s / n) <= 1e-5, (run["stage"], name, step)
            assert scalars[f"channel_tokens/{name}"][step] == n
    if run["lora"]:
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(run["out"], "adapter_model.safetensors"))
        lora_b = [t for k, t in adapter.items() if "lora_B" in k]
        assert lora_b and any(t.abs().max() > 0 for t in lora_b), "the adapters did not train"
        assert "trainable params" in run["log"]
