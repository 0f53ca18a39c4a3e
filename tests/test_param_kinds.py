"""Pure split/merge identities of the TP split kinds (no process groups), and their layouts."""
import pytest
import torch

from checkpoint_tools.canonical import EMBED, LM_HEAD, CanonicalConfig, TensorSource, expected_shapes
from megatron_bridge.megatron_args import args_from_canonical, padded_vocab_size
from megatron_bridge.param_kinds import (COLUMN, GATED_MLP, QKV_KIND, REPLICATED, ROW, VOCAB, Shape, check_tp,
                                         pack_qkv, unpack_qkv)
from megatron_bridge.to_megatron import rank_models

HD = 4
HIDDEN = 16
NQ = 8


def _megatron_accepts(tp, ng):
    # megatron-core: heads divide by TP; groups divide by TP, or (fewer groups than ranks) TP divides by groups
    return NQ % tp == 0 and ((ng >= tp and ng % tp == 0) or (ng < tp and tp % ng == 0))


# Every layout megatron-core accepts over TP in {1, 2, 3, 4, 8} and num_query_groups in {1, 2, all heads}, decided
# here, up front; the ones it rejects (all of TP=3 with 8 heads) are test_rejected_layouts_name_the_valid_tp's.
CASES = [(tp, ng, bias) for tp in (1, 2, 3, 4, 8) for ng in (1, 2, NQ) for bias in (False, True)
         if _megatron_accepts(tp, ng)]


@pytest.mark.parametrize("tp,ng,bias", CASES)
def test_qkv_roundtrip_and_layout(tp, ng, bias):
    check_tp(tp, Shape(NQ, ng, HD), ffn_hidden_size=48)  # accepted: no error
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


def _padded_chunks_by_hand(w, padded, tp):
    """Megatron's vocab-parallel layout, built row by row: the true rows, then zero rows up to `padded`; rank r
    holds rows [r * padded / tp, (r + 1) * padded / tp)."""
    rows = [w[i] for i in range(w.shape[0])] + [torch.zeros(w.shape[1])] * (padded - w.shape[0])
    per = padded // tp
    return [torch.stack(rows[r * per:(r + 1) * per]) for r in range(tp)]


@pytest.mark.parametrize("tp,vocab,padded", [(1, 250, 256), (2, 250, 256), (3, 250, 384), (4, 250, 512),
                                             (8, 250, 1024), (1, 256, 256), (2, 256, 256), (3, 256, 384),
                                             (8, 1000, 1024), (3, 1000, 1152)])
def test_vocab_padding_roundtrip(tp, vocab, padded):
    assert padded_vocab_size(vocab, tp, 128) == padded  # the next multiple of 128 * TP, worked out by hand
    shape = Shape(NQ, NQ, HD, vocab_size=vocab, padded_vocab_size=padded)
    emb = torch.randn(vocab, HIDDEN)
    want = _padded_chunks_by_hand(emb, padded, tp)
    shards = VOCAB.split([emb], tp, shape)
    assert len(shards) == tp and all(torch.equal(s, w) for s, w in zip(shards, want))
    assert all(torch.equal(VOCAB.shard([emb], tp, r, shape), want[r]) for r in range(tp))
    (back,) = VOCAB.merge(want, shape)
    assert torch.equal(back, emb)


class _InMemory(TensorSource):
    def __init__(self, cfg, tensors):
        self.config, self.tensors = cfg, tensors

    def names(self):
        return list(self.tensors)

    def get(self, name):
        return self.tensors[name]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_output_layer_of_tied_and_untied_models(tp, tied):
    """What the writer puts in the vocab-parallel slots: the padded embedding on the first stage and, on the last
    stage, the padded lm_head, or for a tied model the padded embedding again (PP > 1 keeps a copy there; PP = 1
    has no output layer at all)."""
    cfg = CanonicalConfig(vocab_size=250, hidden_size=HIDDEN, intermediate_size=24, num_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=HD, tie_word_embeddings=tied)
    torch.manual_seed(tp)
    tensors = {n: torch.randn(s) for n, s in expected_shapes(cfg).items()}
    source = _InMemory(cfg, tensors)
    padded = {1: 256, 2: 256, 4: 512}[tp]  # 250 rows up to a multiple of 128 * TP
    emb_chunks = _padded_chunks_by_hand(tensors[EMBED], padded, tp)
    head_chunks = emb_chunks if tied else _padded_chunks_by_hand(tensors[LM_HEAD], padded, tp)
    args = args_from_canonical(cfg, tp=tp, pp=2)
    for r in range(tp):
        (first,) = rank_models(source, args, "local", r, 0)
        (last,) = rank_models(source, args, "local", r, 1)
        assert torch.equal(first["embedding.word_embeddings.weight"], emb_chunks[r])
        assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
        assert torch.equal(last["output_layer.weight"], head_chunks[r])
        (only,) = rank_models(source, args_from_canonical(cfg, tp=tp, pp=1), "local", r, 0)
        assert torch.equal(only["embedding.word_embeddings.weight"], emb_chunks[r])
        assert ("output_layer.weight" in only) == (not tied)


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


# Layouts megatron-core rejects: (TP, heads, groups, FFN), what check_tp must say, and the TPs it must offer.
REJECTED = [
    (3, 8, 8, 48, "num_attention_heads=8 is not divisible by TP=3; num_query_groups=8 is not divisible by TP=3",
     [1, 2, 4, 8]),
    (3, 8, 2, 48, "num_attention_heads=8 is not divisible by TP=3; TP=3 is not a multiple of num_query_groups=2 "
     "(needed when groups < TP)",
     [1, 2, 4, 8]),
    (3, 8, 1, 48, "num_attention_heads=8 is not divisible by TP=3", [1, 2, 4, 8]),
    (4, 12, 3, 48, "TP=4 is not a multiple of num_query_groups=3 (needed when groups < TP)", [1, 3, 6, 12]),
    (4, 12, 6, 48, "num_query_groups=6 is not divisible by TP=4", [1, 2, 3, 6, 12]),
    (4, 8, 8, 42, "ffn_hidden_size=42 is not divisible by TP=4", [1, 2]),
]


@pytest.mark.parametrize("tp,nq,ng,ffn,problem,valid", REJECTED)
def test_rejected_layouts_name_the_valid_tp(tp, nq, ng, ffn, problem, valid):
    """The writer calls check_tp before anything is split: a layout megatron-core rejects is refused naming why and
    the TPs that work."""
    with pytest.raises(ValueError) as e:
        check_tp(tp, Shape(nq, ng, HD), ffn_hidden_size=ffn)
    assert str(e.value) == f"{problem}; use TP in {valid}"


def _every_kind(tp, ng, bias):
    """A Shape and canonical input tensors for every split kind (with or without bias, vocab padded for `tp`)."""
    rest = () if bias else (HIDDEN,)
    vocab = 250
    shape = Shape(NQ, ng, HD, vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, tp, 128))
    qkv = [torch.randn((NQ * HD,) + rest), torch.randn((ng * HD,) + rest), torch.randn((ng * HD,) + rest)]
    mlp = [torch.randn(24, HIDDEN), torch.randn(24, HIDDEN)]
    emb = [torch.randn(vocab, HIDDEN)]
    w = [torch.randn(24, 48)]
    return shape, [(QKV_KIND, qkv), (GATED_MLP, mlp), (VOCAB, emb), (COLUMN, w), (ROW, w), (REPLICATED, w)]


@pytest.mark.parametrize("tp,ng,bias", CASES)
def test_single_rank_shard_equals_split(tp, ng, bias):
    """`shard` (what the streaming writer uses) is exactly `split(...)[rank]` for every kind."""
    shape, inputs = _every_kind(tp, ng, bias)
    for kind, ts in inputs:
        full = kind.split(ts, tp, shape)
        for r in range(tp):
            assert torch.equal(kind.shard(ts, tp, r, shape), full[r]), (kind.name, r)


@pytest.mark.parametrize("tp,ng,bias", CASES)
def test_merge_parts_are_blocks_of_merge(tp, ng, bias):
    """`merge_parts` (what the Hugging Face writer streams from TP shards) concatenates to exactly `merge`, block
    by block views of the shards themselves (no copy) for every kind but Row."""
    shape, inputs = _every_kind(tp, ng, bias)
    for kind, ts in inputs:
        shards = kind.split(ts, tp, shape)
        merged, parts = kind.merge(shards, shape), kind.merge_parts(shards, shape)
        assert len(parts) == len(merged) == len(ts), kind.name
        for whole, blocks, original in zip(merged, parts, ts):
            assert torch.equal(torch.cat(blocks), whole) and torch.equal(whole, original), kind.name
            if kind is not ROW:
                storages = {s.untyped_storage().data_ptr() for s in shards}
                assert all(b.untyped_storage().data_ptr() in storages for b in blocks), kind.name


def test_merge_parts_refuse_what_merge_refuses():
    shape = Shape(NQ, 2, HD, vocab_size=250, padded_vocab_size=256)
    with pytest.raises(ValueError, match="linear_qkv has"):
        QKV_KIND.merge_parts([torch.randn(5, HIDDEN)], shape)
    with pytest.raises(ValueError, match="rows < vocab_size"):
        VOCAB.merge_parts([torch.randn(100, HIDDEN), torch.randn(100, HIDDEN)], shape)
    with pytest.raises(ValueError, match="differs between TP rank"):
        REPLICATED.merge_parts([torch.ones(4), torch.zeros(4)], shape)
