"""Channel loss end to end: 2-process DDP (torchrun, gloo), gradient accumulation 2, packing off and on.

The per-channel figures are read back from the real TensorBoard event files and compared with an independent
recomputation: the test tokenizes the samples itself (ChatML by hand), runs each sample alone through the model state
that trained on it (the initial model, then the checkpoint saved after every optimizer step), and sums token losses
per channel over each logging window before dividing once. The data is laid out so that in some steps a channel sits
in a single row (so it is absent on the other rank), and one channel is absent from a whole window.
"""
from __future__ import annotations

import glob
import os
import random

import pytest
import torch

from _sft_helpers import build_model, build_tokenizer, chat_record, torchrun, write_jsonl

WORLD, BATCH, ACCUM, STEPS, LOG_EVERY = 2, 2, 2, 4, 2
ROWS_PER_STEP = WORLD * BATCH * ACCUM
MAX_LEN = 128
TOL = 1e-5

# Channels per row, in file order; a step reads ROWS_PER_STEP consecutive rows (sequential sampling).
UNPACKED_PLAN = [
    ["math", "code", "chat", "code", "chat", "code", "chat", "code"],  # math in one row only
    ["code", "math", "chat", "math", "code", "chat", "math", "chat"],
    ["chat", "chat", "code", "chat", "chat", "chat", "chat", "chat"],  # code in one row only, no math
    ["chat", "code", "chat", "chat", "code", "chat", "chat", "chat"],  # no math in the whole second window
]
# Packed: two sub-samples per row (lengths are kept in [45, 60] tokens, so next-fit into 128 makes exact pairs).
PACKED_PLAN = [
    [("math", "code"), ("code", "chat"), ("chat", "chat"), ("code", "code"),
     ("chat", "code"), ("code", "chat"), ("chat", "chat"), ("code", "chat")],
    [("math", "math"), ("chat", "code"), ("math", "chat"), ("code", "code"),
     ("chat", "math"), ("code", "chat"), ("chat", "chat"), ("math", "code")],
    [("chat", "chat"), ("chat", "code"), ("chat", "chat"), ("chat", "chat"),
     ("chat", "chat"), ("chat", "chat"), ("chat", "chat"), ("chat", "chat")],
    [("chat", "chat"), ("code", "chat"), ("chat", "chat"), ("chat", "code"),
     ("chat", "chat"), ("chat", "chat"), ("code", "chat"), ("chat", "chat")],
]
EVAL_UNPACKED = ["code", "math", "chat", "code", "chat", "math", "code"]  # 7 rows: the last global batch is padded
EVAL_PACKED = ["code", "math", "chat", "code", "chat", "math", "code", "chat", "math"]  # 5 rows, same


# ---------------------------------------------------------------- independent reference (no code under test)

def chatml_ids(tok, messages):
    """ChatML by hand, segment by segment; assistant replies plus their end marker are the supervised tokens."""
    ids, labels = [], []
    for m in messages:
        if m["role"] == "assistant":
            head = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
            body = tok.encode(m["content"] + "<|im_end|>\n", add_special_tokens=False)
            ids += head + body
            labels += [-100] * len(head) + body
        else:
            seg = tok.encode(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", add_special_tokens=False)
            ids += seg
            labels += [-100] * len(seg)
    return ids, labels


def make_sample(rng, tok, channel, lo, hi):
    """A one-exchange record whose token length lies in [lo, hi]."""
    while True:
        record = chat_record(rng, channel, turns=1, n_min=3, n_max=8)
        n = len(chatml_ids(tok, record["messages"])[0])
        if lo <= n <= hi:
            return record


@torch.no_grad()
def channel_sums(model_dir, tok, records):
    """{channel: [loss_sum, token_count]} with every record run alone through the model in ``model_dir``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = {}
    for record in records:
        ids, labels = chatml_ids(tok, record["messages"])
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(labels[1:])
        keep = target != -100
        losses = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
        acc = sums.setdefault(record["channel"], [0.0, 0])
        acc[0] += losses.sum().item()
        acc[1] += int(keep.sum())
    return sums


def merge(into, more):
    for name, (s, n) in more.items():
        acc = into.setdefault(name, [0.0, 0])
        acc[0] += s
        acc[1] += n
    return into


def read_scalars(run_dir):
    """{tag: {step: value}} from every event file the run wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    files = glob.glob(os.path.join(run_dir, "runs", "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {run_dir}/runs"
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ---------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(str(root))
    build_model(str(root), len(tok), seed=0)
    return str(root), tok


def _write_data(tmp, tok, packed, seed):
    rng = random.Random(seed)
    rows = []  # list of rows, each a list of records
    plan = PACKED_PLAN if packed else UNPACKED_PLAN
    for step in plan:
        for row in step:
            channels = row if packed else (row,)
            rows.append([make_sample(rng, tok, c, 45, 60) for c in channels])
    evals = [make_sample(rng, tok, c, 45, 60) for c in (EVAL_PACKED if packed else EVAL_UNPACKED)]
    train = write_jsonl(os.path.join(tmp, "train.jsonl"), [r for row in rows for r in row])
    dev = write_jsonl(os.path.join(tmp, "eval.jsonl"), evals)
    return rows, evals, train, dev


def _assert_layout(rows, packed, tok):
    """Preconditions of the data, checked independently: next-fit into MAX_LEN gives exactly the planned rows, and
    math sits in a single row of step 1 (so on one rank only)."""
    lengths = [len(chatml_ids(tok, r["messages"])[0]) for row in rows for r in row]
    planned = [len(row) for row in rows]
    packed_rows, used = [], MAX_LEN + 1
    for n in lengths:
        if used + n > MAX_LEN:
            packed_rows.append(0)
            used = 0
        packed_rows[-1] += 1
        used += n
    assert planned == (packed_rows if packed else [1] * len(lengths))
    step1 = [{r["channel"] for r in row} for row in rows[:ROWS_PER_STEP]]
    assert sum("math" in channels for channels in step1) == 1


def _run(tmp, model_dir, train, dev, packed):
    out = os.path.join(tmp, "out")
    args = [
        "--model", model_dir, "--data", train, "--eval-data", dev, "--output-dir", out,
        "--max-length", str(MAX_LEN), "--batch-size", str(BATCH), "--grad-accum", str(ACCUM),
        "--max-steps", str(STEPS), "--logging-steps", str(LOG_EVERY), "--save-steps", "1",
        "--eval-steps", str(LOG_EVERY), "--lr", "5e-3", "--no-shuffle", "--report-to", "tensorboard",
        "--disable_tqdm", "true", "--save_only_model", "true", "--dataloader_pin_memory", "false",
    ]
    if packed:
        args.append("--packing")  # channel loss stays on 'auto': the data names channels
    else:
        args += ["--channel-loss", "on"]
    proc = torchrun(args, nproc=WORLD)
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module", params=[False, True], ids=["unpacked", "packed"])
def run(request, tiny, tmp_path_factory):
    packed = request.param
    model_dir, tok = tiny
    tmp = str(tmp_path_factory.mktemp("packed" if packed else "unpacked"))
    rows, evals, train, dev = _write_data(tmp, tok, packed, seed=1 + packed)
    _assert_layout(rows, packed, tok)
    out, log = _run(tmp, model_dir, train, dev, packed)
    return dict(packed=packed, rows=rows, evals=evals, out=out, log=log, model_dir=model_dir, tok=tok)


def _state(run, step):
    """The weights in force during optimizer step ``step`` (1-based): the initial model, then checkpoint step-1."""
    return run["model_dir"] if step == 1 else os.path.join(run["out"], f"checkpoint-{step - 1}")


# ---------------------------------------------------------------- the checks

def test_tokenization_matches_reference(run):
    """The SFT tokenization equals the hand-made ChatML one, so the reference runs the very tokens trained on."""
    from launch.sft_data import ensure_chat_template, load_jsonl, tokenize_dataset

    tok = run["tok"]
    ensure_chat_template(tok)
    path = os.path.join(os.path.dirname(run["out"]), "train.jsonl")
    samples, report = tokenize_dataset(tok, load_jsonl(path), MAX_LEN, path)
    records = [r for row in run["rows"] for r in row]
    assert report.num_truncated == 0 and len(samples) == len(records)
    for sample, record in zip(samples, records):
        assert (sample.input_ids, sample.labels) == chatml_ids(tok, record["messages"])


def test_train_channel_loss_matches_recomputation(run):
    scalars = read_scalars(run["out"])
    tok = run["tok"]
    windows = {}
    per_step_mean = {}
    for step in range(1, STEPS + 1):
        rows = run["rows"][(step - 1) * ROWS_PER_STEP: step * ROWS_PER_STEP]
        sums = channel_sums(_state(run, step), tok, [r for row in rows for r in row])
        merge(windows.setdefault((step - 1) // LOG_EVERY, {}), sums)
        per_step_mean[step] = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())

    for w, sums in windows.items():
        log_step = (w + 1) * LOG_EVERY
        for name in ("chat", "code", "math"):
            logged = scalars.get(f"channel_loss/{name}", {})
            if name not in sums:
                assert log_step not in logged, f"{name} is absent from window {w} yet was logged"
                continue
            expected = sums[name][0] / sums[name][1]
            assert logged[log_step] == pytest.approx(expected, abs=TOL), (name, log_step)
            assert scalars[f"channel_tokens/{name}"][log_step] == sums[name][1]
        # The Trainer's own loss averages the per-step global token means of the window: it checks that the loss
        # the channel path returns for the gradient is normalized like transformers' (across ranks and micro-batches).
        steps = range(w * LOG_EVERY + 1, (w + 1) * LOG_EVERY + 1)
        expected_loss = sum(per_step_mean[s] for s in steps) / LOG_EVERY
        assert scalars["train/loss"][log_step] == pytest.approx(expected_loss, abs=TOL)
    assert "math" not in windows[1], "test layout: math must be absent from the second window"
    assert "channel_loss/math" in scalars and 4 not in scalars["channel_loss/math"]


def test_eval_channel_loss_matches_recomputation(run):
    scalars = read_scalars(run["out"])
    for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
        sums = channel_sums(os.path.join(run["out"], f"checkpoint-{step}"), run["tok"], run["evals"])
        for name, (s, n) in sums.items():
            assert scalars[f"eval_channel_loss/{name}"][step] == pytest.approx(s / n, abs=TOL), (name, step)
            # Counts prove the padding rows that even out the last eval batch across ranks were not counted.
            assert scalars[f"eval_channel_tokens/{name}"][step] == n


def test_log_history_carries_channel_loss(run):
    """Other loggers see the figures: they are in the Trainer's log history (trainer_state.json)."""
    import json

    with open(os.path.join(run["out"], f"checkpoint-{STEPS}", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4]
    assert all("channel_loss/chat" in h for h in train_logs)
    assert all("eval_channel_loss/code" in h for h in eval_logs) and len(eval_logs) == 2
    scalars = read_scalars(run["out"])
    assert train_logs[0]["channel_loss/chat"] == pytest.approx(scalars["channel_loss/chat"][2], rel=1e-6)


def test_plot_renders_one_curve_per_channel(run, tmp_path):
    """The PNG exists, its axes hold one curve per channel with the logged values, and each curve is drawn."""
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb

    from launch.plot_channel_loss import main, render

    out = str(tmp_path / "curves.png")
    assert main([run["out"], "--out", out]) == 0
    assert os.path.getsize(out) > 10_000
    fig = render(run["out"], out)
    scalars = read_scalars(run["out"])
    train_ax, eval_ax = fig.axes
    for ax, prefix in ((train_ax, "channel_loss/"), (eval_ax, "eval_channel_loss/")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["chat", "code", "math"]
        for name, line in lines.items():
            series = scalars[prefix + name]
            assert list(line.get_xdata()) == sorted(series)
            assert list(line.get_ydata()) == pytest.approx([series[s] for s in sorted(series)], rel=1e-6)
    # Every curve is really painted inside its plot area, outside the legend (whose swatches share the colours).
    pixels = torch.tensor(mpimg.imread(out)[..., :3])
    height = pixels.shape[0]
    renderer = FigureCanvasAgg(fig).get_renderer()  # render() closed the figure; its layout is kept
    for ax in (train_ax, eval_ax):
        inside = torch.zeros(pixels.shape[:2], dtype=torch.bool)
        box = ax.get_window_extent(renderer)
        inside[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2] = True
        legend = ax.get_legend().get_window_extent(renderer)
        inside[int(height - legend.y1) - 2:int(height - legend.y0) + 2, int(legend.x0) - 2:int(legend.x1) + 2] = False
        for line in ax.get_lines():
            colour = torch.tensor(to_rgb(line.get_color()), dtype=pixels.dtype)
            painted = ((pixels - colour).abs().max(dim=-1).values < 0.06) & inside
            assert int(painted.sum()) >= 5, f"curve {line.get_label()} is not visible in the PNG"
