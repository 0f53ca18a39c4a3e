"""The channel-loss patch for upstream Megatron-LM (patches/megatron_lm_channel_loss.patch), tested without Megatron-LM.

CI cannot fetch Megatron-LM, so the patch cannot be applied here. What can be tested is the code users get: the
accounting file the patch adds (``megatron/training/channel_loss.py``) is read out of the .patch itself and run on
real tensors over a real gloo process group laid out as TP=2 x DP=2; the figures are compared with a plain-Python
recomputation. The patch's hunks are checked for consistent line counts (what ``git apply`` checks first), and every
``channel_loss.<name>`` the other hunks call must exist in the added file.
"""
from __future__ import annotations

import os
import re
import types

import pytest
import torch
import torch.multiprocessing as mp

PATCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches",
                     "megatron_lm_channel_loss.patch")
ADDED = "megatron/training/channel_loss.py"
TOUCHED = {"pretrain_gpt.py", "megatron/training/training.py", "megatron/training/utils.py",
           "megatron/training/arguments.py", ADDED}


def file_sections(text: str) -> dict[str, list[str]]:
    """{path: the lines of its `diff --git` section}."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"diff --git a/(\S+) b/(\S+)$", line)
        if m:
            current = m.group(2)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def hunks(section: list[str]):
    """(old_start, old_count, new_start, new_count, body lines) for each hunk of one file section."""
    out = []
    for i, line in enumerate(section):
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line)
        if m:
            body = []
            for nxt in section[i + 1:]:
                if nxt.startswith("@@"):
                    break
                body.append(nxt)
            a, b, c, d = m.groups()
            out.append((int(a), int(b if b is not None else 1), int(c), int(d if d is not None else 1), body))
    return out


def added_file_source() -> str:
    """The content of the file the patch creates, exactly as `git apply` would write it."""
    with open(PATCH) as f:
        section = file_sections(f.read())[ADDED]
    assert "new file mode 100644" in section
    [(old_start, old_count, _, new_count, body)] = hunks(section)
    assert (old_start, old_count) == (0, 0)
    lines = [line[1:] for line in body if line.startswith("+")]
    assert len(lines) == new_count
    return "\n".join(lines) + "\n"


def load_added_module() -> types.ModuleType:
    module = types.ModuleType("channel_loss_from_patch")
    exec(compile(added_file_source(), ADDED, "exec"), module.__dict__)
    return module


def test_patch_hunks_are_consistent_and_call_what_the_added_file_defines():
    with open(PATCH) as f:
        text = f.read()
    sections = file_sections(text)
    assert set(sections) == TOUCHED
    for path, section in sections.items():
        assert section[section.index(f"+++ b/{path}") - 1] in (f"--- a/{path}", "--- /dev/null")
        for old_start, old_count, new_start, new_count, body in hunks(section):
            old = sum(1 for line in body if line[:1] in (" ", "-") or line == "")
            new = sum(1 for line in body if line[:1] in (" ", "+") or line == "")
            assert (old, new) == (old_count, new_count), f"{path} hunk @@ -{old_start} +{new_start}: line counts"
    module = load_added_module()
    called = set()
    for path, section in sections.items():
        if path != ADDED:
            for line in section:
                if line.startswith("+"):
                    called |= set(re.findall(r"\bchannel_loss\.(\w+)", line))
    assert called >= {"setup", "channel_names", "add", "start_step", "end_step", "log_window"}
    missing = sorted(name for name in called if not callable(getattr(module, name, None)))
    assert not missing, f"the patch calls channel_loss.{missing} that its added file does not define"
    # The added file stands on torch alone: users apply it to their own Megatron-LM.
    imports = re.findall(r"^(?:from|import) (\S+)", added_file_source(), re.M)
    assert set(imports) <= {"os", "torch", "torch.distributed"}, imports


def test_channel_names_from_preprocess_prefixes_and_flags():
    from launch.preprocess import output_prefix

    m = load_added_module()
    prefixes = [output_prefix(os.path.join("data", "mix"), c) for c in ("code", "web")]
    assert m.channel_names(prefixes) == ["code", "web"]  # what `launch preprocess` prints as --channel-names
    assert m.channel_names(["d/web_a_text_document", "d/web_b_text_document"]) == ["a", "b"]
    assert m.channel_names(["d/web_text_document", "d/webtext_text_document"]) == ["web", "webtext"]
    assert m.channel_names(["d/only_text_document"]) == ["only"]
    assert m.channel_names(None) == ["default"]  # mock data / no blend: one channel
    assert m.channel_names(prefixes, ["c", "w"]) == ["c", "w"]
    with pytest.raises(ValueError, match="--channel-names has 1 names .* the blend has 2 datasets"):
        m.channel_names(prefixes, ["c"])
    with pytest.raises(ValueError, match="repeated; pass --channel-names"):
        m.channel_names(["a/x_text_document", "b/x_text_document"])


def test_report_writes_tensorboard_and_leaves_out_empty_channels(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    m = load_added_module()
    tracker = m.ChannelLoss(["code", "web", "math"])
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    tracker.add(losses, mask, torch.tensor([0, 1]))
    tracker.end_step(keep=True)
    tracker.add(losses * 10, mask, torch.tensor([2, 2]), training=False)
    writer = SummaryWriter(str(tmp_path))
    line = m.report(tracker.reduce(), writer, 7)
    eval_line = m.report(tracker.reduce(evaluation=True), writer, 7, prefix="eval_")
    writer.close()
    assert line == " channel loss code: 1.500000E+00 | channel loss web: 5.000000E+00 |"
    assert eval_line == " channel loss math: 3.250000E+01 |"  # (10 + 20 + 40 + 60) / 4
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert got == {"channel_loss/code": [(7, 1.5)], "channel_tokens/code": [(7, 2.0)],
                   "channel_loss/web": [(7, 5.0)], "channel_tokens/web": [(7, 2.0)],
                   "eval_channel_loss/math": [(7, 32.5)], "eval_channel_tokens/math": [(7, 4.0)]}
    assert tracker.reduce() == {} and tracker.reduce(evaluation=True) == {}  # reduced windows start empty


# ------------------------------------------------------------- TP=2 x DP=2 over gloo, against plain Python

CHANNELS = ["web", "code", "math"]  # math appears only in evaluation
MICRO, BATCH, SEQ = 2, 3, 5


def micro_batches(dp_rank: int, iteration: int, seed_offset: int = 0):
    """Deterministic micro-batches of one DP replica: (per-token losses [b, s], loss mask [b, s], channel ids [b])."""
    g = torch.Generator().manual_seed(1000 * dp_rank + 10 * iteration + seed_offset)
    out = []
    for _ in range(MICRO):
        losses = torch.rand(BATCH, SEQ, generator=g) * 8
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()
        mask[0] = 0 if iteration == 3 else mask[0]  # a sample with no scored token
        ids = torch.randint(0, 2, (BATCH,), generator=g)
        out.append((losses, mask, ids))
    return out


def eval_batches(dp_rank: int):
    return [(l * 0.5, m, (ids + 1) % 3) for l, m, ids in micro_batches(dp_rank, 99)]


def reference(batches) -> dict[str, tuple[float, float]]:
    """Sum token losses and counts per channel with Python floats, then divide once; channels without tokens out."""
    sums = {c: [0.0, 0.0] for c in CHANNELS}
    for losses, mask, ids in batches:
        for row in range(losses.shape[0]):
            name = CHANNELS[int(ids[row])]
            for col in range(losses.shape[1]):
                if mask[row, col]:
                    sums[name][0] += float(losses[row, col])
                    sums[name][1] += 1
    return {c: (s / n, n) for c, (s, n) in sums.items() if n > 0}


def _worker(rank: int, world: int, init_file: str, source: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Megatron's order: TP is the fastest-varying rank index. TP pairs {0,1}, {2,3} hold identical losses;
    # DP groups {0,2}, {1,3}.
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_rank, tp_rank = rank // 2, rank % 2
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    module = types.ModuleType("channel_loss_from_patch")
    exec(compile(source, ADDED, "exec"), module.__dict__)
    module.setup(CHANNELS)
    m = module
    results = {}
    # Iteration 1: a faulty first run of the step, then the rerun state machine runs it again.
    m.start_step()
    for losses, mask, ids in micro_batches(dp_rank, 1, seed_offset=5):
        m.add(losses.view(-1), mask.view(-1), ids)  # loss_func hands flat b*s tensors
    m.start_step()
    for losses, mask, ids in micro_batches(dp_rank, 1):
        m.add(losses.view(-1), mask.view(-1), ids)
    m.end_step(keep=True)
    # Iteration 2 is skipped (an fp16 overflow): left out as 'lm loss' leaves it out.
    m.start_step()
    for losses, mask, ids in micro_batches(dp_rank, 2):
        m.add(losses.view(-1), mask.view(-1), ids)
    m.end_step(keep=False)
    # Evaluation in between: the model is in eval mode, its own sums.
    for losses, mask, ids in eval_batches(dp_rank):
        m.add(losses, mask, ids, training=False)
    m.start_step()
    for losses, mask, ids in micro_batches(dp_rank, 3):
        m.add(losses, mask, ids)
    m.end_step(keep=True)
    results["collectives_while_adding"] = len(calls)
    group = dp_groups[tp_rank]
    results["window1"] = m.get().reduce(group)
    results["eval"] = m.get().reduce(group, evaluation=True)
    m.start_step()
    for losses, mask, ids in micro_batches(dp_rank, 4):
        m.add(losses, mask, ids)
    m.end_step(keep=True)
    results["window2_line"] = m.log_window(4, None, group)
    results["collectives"] = len(calls)
    results["groups_ok"] = all(g is group for g in calls)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_accounting_over_tp2_dp2_gloo_matches_plain_python(tmp_path):
    world = 4
    mp.spawn(_worker, args=(world, str(tmp_path / "pg"), added_file_source(), str(tmp_path)), nprocs=world)
    both = range(2)
    want1 = reference([b for dp in both for it in (1, 3) for b in micro_batches(dp, it)])
    want_eval = reference([b for dp in both for b in eval_batches(dp)])
    want2 = reference([b for dp in both for b in micro_batches(dp, 4)])
    assert "math" not in want1 and "math" in want_eval  # a channel absent from a window is left out
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["collectives_while_adding"] == 0  # nothing per micro-batch
        assert got["collectives"] == 3 and got["groups_ok"]  # one all_reduce per window, over DP only
        for name, want in (("window1", want1), ("eval", want_eval)):
            assert set(got[name]) == set(want), (rank, name)
            for channel, (loss, tokens) in want.items():
                assert got[name][channel][1] == tokens, (rank, name, channel)
                assert got[name][channel][0] == pytest.approx(loss, rel=1e-12), (rank, name, channel)
        expected_line = "".join(f" channel loss {c}: {loss:.6E} |" for c, (loss, _) in want2.items())
        assert got["window2_line"] == expected_line  # the window restarted after the first reduce
