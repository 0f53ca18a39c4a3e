"""Pure split/merge identities of the TP split kinds (no process groups), and their layouts."""
import itertools

import pytest
import torch

from megatron_bridge.param_kinds import (COLUMN, GATED_MLP, QKV_KIND, REPLICATED, ROW, VOCAB, Shape, check_tp,
                                         pack_qkv, unpack_qkv)
from megatron_bridge.megatron_args import padded_vocab_size

HD = 4
HIDDEN = 16
NQ = 8


def _groups(tp):
    # num_query_groups in {1, 2, all heads}, keeping only layouts megatron-core accepts at this TP
    return [ng for ng in (1, 2, NQ) if (ng >= tp and ng % tp == 0) or (ng < tp and tp % ng == 0)]


CASES = [(tp, ng, bias) for tp in (1, 2, 3, 4, 8) for ng in (1, 2, NQ) for bias in (False, True)]


@pytest.mark.parametrize("tp,ng,bias", CASES)
def test_qkv_roundtrip_and_layout(tp, ng, bias):
    if NQ % tp or ng not in _groups(tp):
        with pytest.raises(ValueError, match="use TP in"):
            check_tp(tp, Shape(NQ, ng, HD), ffn_hidden_size=48)
        return
    shape = Shape(NQ, ng, HD)
    rest = () if bias else (HIDDEN,)
    q = torch.randn((NQ * HD,) + rest)
    k = torch.randn((ng * HD,) + rest)
    v = torch.randn((ng * HD,) + rest)
    shards = QKV_KIND.split([q, k, v], tp, shape)
    assert len(shards) == tp and all(s.shape[0] == (NQ + 2 * ng) * HD // tp for s in shards)
    q2, k2, v2 = QKV_KIND.merge(shards, shape)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    # Layout: group g is [q heads g*per .. (g+1)*per-1, k_g, v_g]
    fused = pack_qkv(q, k, v, shape)
    per = NQ // ng
    for g in range(ng):
        block = fused[g * (per + 2) * HD:(g + 1) * (per + 2) * HD]
        assert torch.equal(block[: per * HD], q[g * per * HD:(g + 1) * per * HD])
        assert torch.equal(block[per * HD:(per + 1) * HD], k[g * HD:(g + 1) * HD])
        assert torch.equal(block[(per + 1) * HD:], v[g * HD:(g + 1) * HD])
    # Each rank's shard is an even chunk of the fused tensor (also when groups < TP).
    assert torch.equal(torch.cat(shards), fused)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_gated_mlp_splits_gate_and_up_separately(tp):
    f = 24
    gate, up = torch.randn(f, HIDDEN), torch.randn(f, HIDDEN)
    shards = GATED_MLP.split([gate, up], tp, Shape(NQ, NQ, HD))
    for r, s in enumerate(shards):
        n = f // tp
        assert torch.equal(s, torch.cat([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]))
    g2, u2 = GATED_MLP.merge(shards, Shape(NQ, NQ, HD))
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    if tp > 1:  # a plain chunk of [gate; up] would be wrong
        assert not torch.equal(shards[0], torch.cat([gate, up]).chunk(tp)[0])


@pytest.mark.parametrize("tp,vocab,tied", list(itertools.product([1, 2, 3, 4, 8], [250, 256, 1000], [False, True])))
def test_vocab_padding_roundtrip(tp, vocab, tied):
    padded = padded_vocab_size(vocab, tp, 128)
    assert padded % (128 * tp) == 0 and padded >= vocab and padded - vocab < 128 * tp
    shape = Shape(NQ, NQ, HD, vocab_size=vocab, padded_vocab_size=padded)
    emb = torch.randn(vocab, HIDDEN)
    shards = VOCAB.split([emb], tp, shape)
    assert all(s.shape == (padded // tp, HIDDEN) for s in shards)
    assert torch.count_nonzero(torch.cat(shards)[vocab:]) == 0
    (back,) = VOCAB.merge(shards, shape)
    assert torch.equal(back, emb)
    if tied:  # the output layer of a tied model is the same tensor split the same way
        assert all(torch.equal(a, b) for a, b in zip(shards, VOCAB.split([emb], tp, shape)))


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_column_row_replicated(tp):
    w = torch.randn(24, 48)
    assert torch.equal(COLUMN.merge(COLUMN.split([w], tp, None), None)[0], w)
    assert torch.equal(ROW.merge(ROW.split([w], tp, None), None)[0], w)
    rows = ROW.split([w], tp, None)
    assert all(r.shape == (24, 48 // tp) for r in rows)
    n = torch.randn(16)
    assert torch.equal(REPLICATED.merge(REPLICATED.split([n], tp, None), None)[0], n)


def test_replicated_merge_detects_divergence():
    a = torch.ones(4)
    with pytest.raises(ValueError, match="differs between TP rank 0 and rank 1"):
        REPLICATED.merge([a, a + 1], None)


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError, match="linear_qkv has"):
        unpack_qkv(torch.zeros(10, 4), Shape(NQ, 2, HD))


def test_check_tp_names_values_and_choices():
    with pytest.raises(ValueError) as e:
        check_tp(2, Shape(num_heads=9, num_groups=3, head_dim=64), ffn_hidden_size=1536)
    msg = str(e.value)
    assert "num_attention_heads=9 is not divisible by TP=2" in msg and "use TP in [1, 3]" in msg
    check_tp(3, Shape(num_heads=9, num_groups=3, head_dim=64), ffn_hidden_size=1536)


@pytest.mark.parametrize("tp,ng,bias", CASES)
def test_single_rank_shard_equals_split(tp, ng, bias):
    """`shard` (what the streaming writer uses) is exactly `split(...)[rank]` for every kind."""
    if NQ % tp or ng not in _groups(tp):
        return
    rest = () if bias else (HIDDEN,)
    vocab = 250
    shape = Shape(NQ, ng, HD, vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, tp, 128))
    qkv = [torch.randn((NQ * HD,) + rest), torch.randn((ng * HD,) + rest), torch.randn((ng * HD,) + rest)]
    mlp = [torch.randn(24, HIDDEN), torch.randn(24, HIDDEN)]
    emb = [torch.randn(vocab, HIDDEN)]
    w = [torch.randn(24, 48)]
    for kind, ts in [(QKV_KIND, qkv), (GATED_MLP, mlp), (VOCAB, emb), (COLUMN, w), (ROW, w), (REPLICATED, w)]:
        full = kind.split(ts, tp, shape)
        for r in range(tp):
            assert torch.equal(kind.shard(ts, tp, r, shape), full[r]), (kind.name, r)
