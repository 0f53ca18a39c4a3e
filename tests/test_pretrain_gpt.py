"""pretrain_gpt on megatron-core: channel loss exact across layouts, packed SFT, --eval-only, resume, collectives.

A tiny random Llama (vocab 256, 4 layers) is converted to Megatron at each layout; three indexed datasets draw their
tokens from disjoint id ranges, so the channel of every token is known independently. With lr=0 the weights stay the
converted ones, and the per-channel losses read back from the real TensorBoard event files must equal the
`transformers` model's per-token cross entropy on the very token ids of the batches (dumped by the run), grouped by
the id range, summed, divided once (fp32, 1e-5), and agree across TP=1, TP2 x PP2, DP2 x PP2 and PP2 x VPP2.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from _pretrain_gpt_helpers import (CHANNEL_RANGES, VOCAB, Reference, channel_of_token, read_dump, read_scalars,
                                   run, sft_record, write_indexed, write_jsonl)
from conftest import make_llama

TOL = 1e-5
SEQ, ITERS, LOG = 32, 4, 2
# (name, nproc, flags): every layout sees the same 4 sequences per step.
LAYOUTS = [
    ("tp1", 1, ["--micro-batch-size", "2"]),
    ("tp2_pp2", 4, ["--tp", "2", "--pp", "2", "--micro-batch-size", "2"]),
    ("dp2_pp2", 4, ["--pp", "2", "--micro-batch-size", "1"]),
    ("pp2_vpp2", 2, ["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "1"]),
]
CONVERT = {"tp1": (1, 1, 1), "tp2_pp2": (2, 2, 1), "dp2_pp2": (1, 2, 1), "pp2_vpp2": (1, 2, 2)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron

    root = tmp_path_factory.mktemp("pretrain")
    hf = make_llama(str(root / "hf"), vocab_size=VOCAB, max_position_embeddings=64)
    ckpts = {name: hf_to_megatron(hf, str(root / f"mg_{name}"), ConvertOptions(tp=t, pp=p, vpp=v, progress=False))
             for name, (t, p, v) in CONVERT.items()}
    prefixes = {c: write_indexed(str(root / c), c, docs=30, seed=i) for i, c in enumerate(CHANNEL_RANGES)}
    blend = ["0.3", prefixes["code"], "0.3", prefixes["math"], "0.4", prefixes["chat"]]
    return dict(root=root, hf=hf, ckpts=ckpts, prefixes=prefixes, blend=blend)


def _common(corpus, name):
    root = corpus["root"]
    return ["--load", corpus["ckpts"][name], "--data-path", *corpus["blend"], "--split", "90,10,0",
            "--seq-length", str(SEQ), "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "0",
            "--log-interval", str(LOG), "--eval-interval", str(LOG), "--eval-iters", "1",
            "--data-cache-path", str(root / "cache"), "--tensorboard-dir", str(root / name / "tb"),
            "--dump-batches", str(root / name / "dump")]


@pytest.fixture(scope="module")
def layouts(corpus):
    out = {}
    for name, nproc, flags in LAYOUTS:
        probe = str(corpus["root"] / name / "probe") if name == "dp2_pp2" else None
        log = run(_common(corpus, name) + flags, nproc=nproc, probe_dir=probe)
        out[name] = dict(log=log, dir=corpus["root"] / name, probe=probe)
    return out


def _reference_windows(corpus, dump_dir, kind="train"):
    """{window: {channel: [sum, count]}} from the dumped token ids, channels told by the token's id range."""
    names, batches = read_dump(dump_dir)
    assert names == sorted(CHANNEL_RANGES)
    ref = Reference(corpus["hf"])
    windows = {}
    for b in batches:
        if b["kind"] != kind:
            continue
        # The channel ids the run attached agree with the independent id-range rule, token by token.
        scored = b["loss_mask"].bool()
        run_channels = [names[c] for c in b["channel_ids"][scored].tolist()]
        assert run_channels == [channel_of_token(t) for t in b["labels"][scored].tolist()]
        window = b["iteration"] // LOG if kind == "train" else b["iteration"]
        ref.add_rows(windows.setdefault(window, {}), b["tokens"], b["labels"], scored, channel_of_token)
    return windows


@pytest.mark.parametrize("name", [n for n, _, _ in LAYOUTS])
def test_channel_loss_equals_transformers(corpus, layouts, name):
    scalars = read_scalars(str(layouts[name]["dir"] / "tb"))
    windows = _reference_windows(corpus, str(layouts[name]["dir"] / "dump"))
    assert sorted(windows) == [0, 1]
    for w, sums in windows.items():
        step = (w + 1) * LOG
        for channel in CHANNEL_RANGES:
            logged = scalars.get(f"channel_loss/{channel}", {})
            if channel not in sums:
                assert step not in logged, f"{channel} had no token in window {w} yet was logged"
                continue
            s, n = sums[channel]
            assert logged[step] == pytest.approx(s / n, abs=TOL), (name, channel, step)
            assert scalars[f"channel_tokens/{channel}"][step] == n
        total = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
        assert scalars["lm loss"][step] == pytest.approx(total, abs=TOL)
    # Evaluation writes its own channel curves from the validation split.
    evals = _reference_windows(corpus, str(layouts[name]["dir"] / "dump"), kind="eval")
    for it, sums in evals.items():
        for channel, (s, n) in sums.items():
            assert scalars[f"eval_channel_loss/{channel}"][it] == pytest.approx(s / n, abs=TOL)
    assert "channel loss: chat" in layouts[name]["log"]


def test_layouts_agree(layouts):
    """Every layout saw the same batches and reports the same per-channel figures."""
    tables = {name: read_scalars(str(info["dir"] / "tb")) for name, info in layouts.items()}
    base = tables["tp1"]
    tags = [t for t in base if t.startswith(("channel_loss/", "channel_tokens/", "eval_channel_loss/"))]
    assert len(tags) >= 6
    for name, table in tables.items():
        for tag in tags:
            assert table[tag].keys() == base[tag].keys(), (name, tag)
            for step, value in base[tag].items():
                assert table[tag][step] == pytest.approx(value, abs=TOL), (name, tag, step)


def test_one_channel_collective_per_logging_window(layouts):
    """DP2 x PP2: on each last-stage rank exactly one channel-loss all_reduce per logging window (2 train windows +
    2 evaluations), none inside a micro-batch; first-stage ranks never reduce channel loss."""
    probe = layouts["dp2_pp2"]["probe"]
    reduces = {}
    for rank in range(4):
        with open(os.path.join(probe, f"rank{rank}.json")) as f:
            calls = json.load(f)
        channel = [c for c in calls if c["channel"] and c["op"] == "all_reduce"]
        assert not [c for c in calls if c["channel"] and c["in_micro_batch"]], f"rank {rank}: collective in a " \
                                                                               "micro-batch"
        assert all(c["shape"] == [len(CHANNEL_RANGES), 2] for c in channel)
        reduces[rank] = len(channel)
    # Ranks 0, 1 are the first stage (DP ranks 0, 1), ranks 2, 3 the last (Megatron's rank order: TP, DP, PP).
    assert reduces == {0: 0, 1: 0, 2: ITERS // LOG * 2, 3: ITERS // LOG * 2}


# ---------------------------------------------------------------------------------------------- SFT, packed

def test_packed_sft_each_token_counts_for_its_own_channel(corpus, tmp_path):
    """Rows of three packed samples mixing channels, TP=2: the per-channel losses equal every sample run alone
    through `transformers` (so attention never crossed a sample and each token kept its sample's channel); a
    channel absent from the second window is left out of it, never NaN."""
    rng = random.Random(7)
    plan = [["code", "math", "chat"], ["chat", "code", "math"],        # step 1: rows of 3 samples x 10 tokens
            ["code", "chat", "chat"], ["chat", "code", "code"]]        # step 2: no math
    records = [sft_record(rng, c, 11, prompt=rng.randint(1, 4)) for row in plan for c in row]
    data = write_jsonl(str(tmp_path / "sft.jsonl"), records)
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron

    mg = hf_to_megatron(corpus["hf"], str(tmp_path / "mg_tp2"), ConvertOptions(tp=2, progress=False))
    run(["--tp", "2", "--load", mg, "--sft-data", data, "--packing", "--seq-length", str(SEQ),
         "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2", "--lr", "0",
         "--log-interval", "1", "--tensorboard-dir", str(tmp_path / "tb"), "--dump-batches", str(tmp_path / "dump")],
        nproc=2)
    _, batches = read_dump(str(tmp_path / "dump"))
    for b in batches:  # each row really holds three packed samples of mixed channels
        assert int(b["channel_ids"].ge(0).sum()) == 30 and len(set(b["channel_ids"][0, :30].tolist())) > 1
    scalars = read_scalars(str(tmp_path / "tb"))
    ref = Reference(corpus["hf"])
    for step in (1, 2):
        sums = {}
        for record in records[(step - 1) * 6: step * 6]:
            ref.add_sample(sums, record)
        for channel in CHANNEL_RANGES:
            logged = scalars.get(f"channel_loss/{channel}", {})
            if channel not in sums:
                assert step not in logged and step == 2 and channel == "math"
                continue
            assert logged[step] == pytest.approx(sums[channel][0] / sums[channel][1], abs=TOL), (channel, step)
            assert scalars[f"channel_tokens/{channel}"][step] == sums[channel][1]


# ---------------------------------------------------------------------------------------------- eval-only

def test_eval_only_scores_every_sample_exactly_once(corpus, tmp_path):
    """DP=2, 7 samples, global batch 4: the last batch is padded; the table and JSON equal `transformers` over the
    whole data set, and the dumped rows hold every sample exactly once."""
    rng = random.Random(3)
    channels = ["code", "math", "chat", "code", "chat", "math", "code"]
    records = [sft_record(rng, c, rng.randint(8, 20), prompt=rng.randint(1, 5)) for c in channels]
    data = write_jsonl(str(tmp_path / "eval.jsonl"), records)
    out = str(tmp_path / "eval.json")
    log = run(["--load", corpus["ckpts"]["tp1"], "--sft-data", data, "--eval-only", "--eval-output", out,
               "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
               "--dump-batches", str(tmp_path / "dump")], nproc=2)
    ref = Reference(corpus["hf"])
    sums = {}
    for record in records:
        ref.add_sample(sums, record)
    with open(out) as f:
        result = json.load(f)
    assert result["samples"] == len(records)
    for channel, (s, n) in sums.items():
        assert result["channels"][channel]["loss"] == pytest.approx(s / n, abs=TOL)
        assert result["channels"][channel]["tokens"] == n
        assert f"{channel}" in log
    _, batches = read_dump(str(tmp_path / "dump"))
    seen = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            n = int(b["channel_ids"][row].ge(0).sum())
            if n:
                seen.append(b["tokens"][row, :n].tolist())
            else:
                assert not b["loss_mask"][row].any()
    assert sorted(seen) == sorted(r["input_ids"][:-1] for r in records)


# ---------------------------------------------------------------------------------------------- resume

def test_resume_continues_the_exact_run_and_converts_back(corpus, tmp_path):
    """Save at step 3 as torch_dist and stop (--exit-interval), resume and save at step 5 as legacy, resume again: steps
    1..7 log the uninterrupted run's losses; training lowers the loss; the saved checkpoint (with optimizer state)
    converts back to Hugging Face and loads."""
    from transformers import LlamaForCausalLM

    from megatron_bridge.convert import ConvertOptions, megatron_to_hf

    common = ["--data-path", *corpus["blend"], "--split", "100,0,0", "--seq-length", str(SEQ),
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "7", "--lr", "1e-2",
              "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
              "--data-cache-path", str(corpus["root"] / "cache")]
    whole = run(["--load", corpus["ckpts"]["tp1"], *common, "--tensorboard-dir", str(tmp_path / "whole")])
    part = ["--tensorboard-dir", str(tmp_path / "part")]
    dist_ckpt, legacy = str(tmp_path / "dist_ckpt"), str(tmp_path / "legacy")
    run(["--load", corpus["ckpts"]["tp1"], *common, *part, "--exit-interval", "3", "--save", dist_ckpt,
         "--ckpt-format", "torch_dist"])
    assert os.path.isfile(os.path.join(dist_ckpt, "iter_0000003", "metadata.json"))
    second = run(["--load", dist_ckpt, *common, *part, "--exit-interval", "5", "--save", legacy])
    with open(os.path.join(legacy, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "5"
    third = run(["--load", legacy, *common, *part, "--save", legacy])
    assert "resumed at iteration 3" in second and "resumed at iteration 5" in third
    a, b = read_scalars(str(tmp_path / "whole")), read_scalars(str(tmp_path / "part"))
    assert sorted(b["lm loss"]) == list(range(1, 8))
    for step in range(1, 8):
        assert b["lm loss"][step] == pytest.approx(a["lm loss"][step], abs=1e-6), step
        for channel in CHANNEL_RANGES:
            assert b[f"channel_loss/{channel}"][step] == pytest.approx(a[f"channel_loss/{channel}"][step], abs=1e-6)
    back = megatron_to_hf(legacy, str(tmp_path / "hf_back"), ConvertOptions(progress=False))
    model, info = LlamaForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Training lowered the loss: the trained model, back in Hugging Face form, against the converted one, on the
    # same documents of every channel.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    datasets = [IndexedDataset(p) for p in corpus["prefixes"].values()]  # alive while their mmapped rows are read
    docs = [torch.tensor(ds[d].astype("int64")) for ds in datasets for d in range(8)]
    losses = {}
    for name, path in (("start", corpus["hf"]), ("trained", back)):
        ref, total = Reference(path), [0.0, 0]
        for doc in docs:
            total[0] += float(ref.token_losses(doc[None, :-1], doc[None, 1:]).sum())
            total[1] += len(doc) - 1
        losses[name] = total[0] / total[1]
    assert losses["trained"] < losses["start"] - 0.1, losses
    assert "lm loss" in whole


def test_plot_renders_the_run(layouts, tmp_path):
    """`python -m launch plot` draws one curve per channel with the logged values, train and eval."""
    from launch.cli import main
    from launch.plot_channel_loss import render

    tb = str(layouts["tp1"]["dir"] / "tb")
    out = str(tmp_path / "curves.png")
    assert main(["plot", tb, "--out", out]) == 0 and os.path.getsize(out) > 10_000
    scalars = read_scalars(tb)
    train_ax, eval_ax = render(tb, out).axes
    for ax, prefix in ((train_ax, "channel_loss/"), (eval_ax, "eval_channel_loss/")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == sorted(CHANNEL_RANGES)
        for name, line in lines.items():
            series = scalars[prefix + name]
            assert list(line.get_ydata()) == pytest.approx([series[s] for s in sorted(series)], rel=1e-6)


def test_eval_only_on_indexed_data_scores_every_document_token_once(corpus, tmp_path):
    """--eval-only --data-path: every document cut into windows of seq+1 tokens, each scored token once, equal to
    `transformers` on the same windows (read here with megatron-core's own IndexedDataset)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = [corpus["prefixes"]["math"], corpus["prefixes"]["chat"]]
    out = str(tmp_path / "eval.json")
    run(["--load", corpus["ckpts"]["tp1"], "--data-path", *prefixes, "--channel-names", "m", "c", "--eval-only",
         "--eval-output", out, "--seq-length", "16", "--micro-batch-size", "4"])
    ref = Reference(corpus["hf"])
    sums = {}
    for prefix, name in zip(prefixes, ("m", "c")):
        ds = IndexedDataset(prefix)
        for d in range(len(ds)):
            doc = torch.tensor(ds[d].astype("int64"))
            for start in range(0, len(doc) - 1, 16):
                piece = doc[start:start + 17]
                mask = torch.ones(1, len(piece) - 1, dtype=torch.bool)
                ref.add_rows(sums, piece[None, :-1], piece[None, 1:], mask, lambda _t, n=name: n)
    with open(out) as f:
        result = json.load(f)
    for name, (s, n) in sums.items():
        assert result["channels"][name]["tokens"] == n
        assert result["channels"][name]["loss"] == pytest.approx(s / n, abs=TOL)
