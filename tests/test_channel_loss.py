"""The framework-free channel-loss accounting against brute-force Python sums."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from patches.channel_loss import (
    ChannelIndex,
    ChannelLossAccumulator,
    ChannelStat,
    build_index,
    shifted_token_losses,
    stats_to_logs,
)


def _random_batch(gen, rows=3, cols=11, channels=3):
    loss = torch.rand(rows, cols, generator=gen, dtype=torch.float32) * 5
    chan = torch.randint(0, channels, (rows, cols), generator=gen)
    mask = torch.rand(rows, cols, generator=gen) > 0.3
    chan[0, :3] = -1  # padding
    return loss, chan, mask


def test_index_is_sorted_fixed_and_strict():
    index = build_index(["math", None, "code", "math"])
    assert index.names == ("code", "default", "math")
    assert index.id("math") == 2 and len(index) == 3
    assert index.fingerprint() == ChannelIndex(["math", "default", "code"]).fingerprint()
    with pytest.raises(ValueError, match="'poetry' is not in the channel index"):
        index.id("poetry")
    with pytest.raises(ValueError, match="non-empty strings"):
        ChannelIndex(["ok", ""])


def test_token_mode_sums_over_micro_batches_then_divides_once():
    gen = torch.Generator().manual_seed(0)
    index = ChannelIndex(["a", "b", "c"])
    acc = ChannelLossAccumulator(index)
    expected = {n: [0.0, 0] for n in index.names}
    for _ in range(4):  # four micro-batches of one logging window
        loss, chan, mask = _random_batch(gen)
        acc.add(loss, chan, mask)
        for l, c, m in zip(loss.flatten().tolist(), chan.flatten().tolist(), mask.flatten().tolist()):
            if m and c >= 0:
                expected[index.names[c]][0] += l
                expected[index.names[c]][1] += 1
    stats = acc.reduce()
    for name, (s, n) in expected.items():
        assert stats[name].count == n
        assert stats[name].mean == pytest.approx(s / n, rel=1e-12, abs=1e-9)
    # The window is reset after a reduce.
    assert all(stat.count == 0 for stat in acc.reduce().values())


def test_sample_mode_is_mean_of_sample_means():
    index = ChannelIndex(["a", "b"])
    acc = ChannelLossAccumulator(index, mode="sample")
    # One row, two packed samples: sample 0 (channel a) tokens 1,2,3 ; sample 1 (channel b) tokens 4,5 ; pad.
    loss = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0, 4.0, 6.0, 0.0]])
    chan = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    sample = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    mask = torch.tensor([[False, True, True, True, False, True, True, False]])
    acc.add(loss, chan, mask, sample)
    # Second micro-batch: one more channel-a sample, and a sample with no supervised token (must not count).
    acc.add(torch.tensor([[5.0, 7.0, 1.0]]), torch.tensor([[0, 0, 1]]), torch.tensor([[True, True, False]]),
            torch.tensor([[0, 0, 1]]))
    stats = acc.reduce()
    assert stats["a"].count == 2 and stats["a"].mean == pytest.approx((2.0 + 6.0) / 2)
    assert stats["b"].count == 1 and stats["b"].mean == pytest.approx(5.0)
    with pytest.raises(ValueError, match="needs sample_ids"):
        acc.add(loss, chan, mask)


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="'median' is not one of"):
        ChannelLossAccumulator(ChannelIndex(["a"]), mode="median")


def test_logs_skip_channels_without_tokens():
    logs = stats_to_logs({"a": ChannelStat(6.0, 3), "b": ChannelStat(0.0, 0)}, prefix="eval_")
    assert logs == {"eval_channel_loss/a": 2.0, "eval_channel_tokens/a": 3}
    assert math.isnan(ChannelStat(0.0, 0).mean)


def test_shifted_token_losses_match_transformers_loss():
    """Summed per-token losses over the valid count are transformers' ForCausalLMLoss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 13, generator=gen)
    labels = torch.randint(0, 13, (2, 7), generator=gen)
    labels[0, :3] = -100
    token_loss, valid = shifted_token_losses(logits, labels)
    assert token_loss.shape == valid.shape == (2, 6)
    ours = token_loss.sum() / valid.sum()
    theirs = ForCausalLMLoss(logits, labels, vocab_size=13)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    index = ChannelIndex(["a", "b", "c"])
    acc = ChannelLossAccumulator(index)
    # Channel c only on rank 1; channel b nowhere.
    if rank == 0:
        acc.add(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    else:
        acc.add(torch.tensor([4.0, 10.0]), torch.tensor([0, 2]))
    stats = acc.reduce()
    results[rank] = {k: (v.loss_sum, v.count) for k, v in stats.items()}
    dist.destroy_process_group()


def test_reduce_is_one_sum_over_ranks():
    """Two gloo processes: the reduced figures are the sums over ranks, identical on every rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    expected = {"a": (7.0, 3.0), "b": (0.0, 0.0), "c": (10.0, 1.0)}
    assert results[0] == results[1] == expected
