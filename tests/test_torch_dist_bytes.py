"""The torch_dist writer's own byte paths equal what PyTorch writes: each chunk's archive equals `torch.save` of the
chunk (streamed from pieces, CRC-ed on the way), the DCP index equals `pickle.dumps` of DCP's own classes, and the
pieces of every parameter kind concatenate to the kind's TP=1 tensor. Real megatron-core loading the output is
tests/test_torch_dist_stream.py's job."""
from __future__ import annotations

import filecmp
import io
import os
import pickle

import pytest
import torch

from conftest import make_llama
from megatron_bridge import dcp_index, torch_dist_writer, torch_save_blob
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.param_kinds import COLUMN, GATED_MLP, QKV_KIND, REPLICATED, ROW, VOCAB, Shape
from megatron_bridge.torch_dist_writer import DcpFiles, pieces_of


def _torch_save(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_the_installed_torch_writes_the_layout_the_writer_knows():
    # If this fails, torch.save changed its archive: the writer falls back to torch.save (slower, still correct).
    assert torch_save_blob.archive_matches_torch()


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (1, 96, 64)), (torch.float32, (250, 64)),
                                         (torch.float16, (1, 7)), (torch.int64, (3,)), (torch.bfloat16, (1, 1, 1))])
def test_streamed_archive_equals_torch_save(tmp_path, dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    rows = t.reshape(-1, shape[-1]) if len(shape) > 1 else t
    cut = [rows[:1], rows[1:]] if rows.shape[0] > 1 else [rows]  # pieces: the archive is built across them
    files = DcpFiles(str(tmp_path), max_file_bytes=1 << 30)
    files.write_bytes(b"x" * 13)  # the archive need not start at the file's start
    info = files.write_pieces(dtype, shape, cut)
    files.close()
    with open(tmp_path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        got = f.read(info.length)
    assert got == _torch_save(t)
    assert torch.equal(torch.load(io.BytesIO(got), weights_only=True), t)


def test_chunk_past_the_fast_layout_goes_through_torch_save(tmp_path, monkeypatch):
    """A chunk the archive module does not write (past 4 GB, an unknown torch) is written by torch.save, between
    streamed ones, at the offsets the index records."""
    a, b, c = torch.randn(4, 3), torch.randn(2, 5), torch.randn(6)
    files = DcpFiles(str(tmp_path), max_file_bytes=1 << 30)
    infos = [files.write_pieces(a.dtype, tuple(a.shape), [a])]
    monkeypatch.setattr(torch_dist_writer, "fast_archive", lambda dtype, shape: None)
    infos.append(files.write_pieces(b.dtype, tuple(b.shape), [b[:1], b[1:]]))
    monkeypatch.undo()
    infos.append(files.write_pieces(c.dtype, tuple(c.shape), [c]))
    files.close()
    data = (tmp_path / "__0_0.distcp").read_bytes()
    assert data == b"".join(_torch_save(t) for t in (a, b, c))
    assert [(i.offset, i.length) for i in infos] == [(0, len(_torch_save(a))),
                                                    (len(_torch_save(a)), len(_torch_save(b))),
                                                    (len(_torch_save(a)) + len(_torch_save(b)), len(_torch_save(c)))]


def test_index_pickles_as_dcps_own_classes():
    """Two files, tensors and byte objects, shared key strings: the stand-ins' pickle is DCP's, byte for byte."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    def build(real: bool):
        sd, st = {}, {}
        for n, key in enumerate(["embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc1.weight"]):
            name, chunks = f"__0_{n}.distcp", []
            for layer in range(3):
                off, size = (layer, 0, 0), (1, 4, 5)
                if real:
                    st[MetadataIndex(key, off)] = _StorageInfo(relative_path=name, offset=layer * 99, length=99)
                    chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)))
                else:
                    st[dcp_index.index(key, off)] = dcp_index.storage_info(name, layer * 99, 99)
                    chunks.append(dcp_index.chunk(off, size))
            sd[key] = (TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size((3, 4, 5)), chunks)
                       if real else dcp_index.tensor_metadata(torch.bfloat16, (3, 4, 5), chunks))
        for key in ["decoder.layers.mlp.linear_fc1._extra_state/shard_0_3"]:
            if real:
                st[MetadataIndex(key)], sd[key] = _StorageInfo("__0_1.distcp", 7, 11), BytesStorageMetadata()
            else:
                st[dcp_index.index(key)], sd[key] = dcp_index.storage_info("__0_1.distcp", 7, 11), \
                    dcp_index.bytes_metadata()
        if real:
            return Metadata(state_dict_metadata=sd, storage_data=st, storage_meta=StorageMeta(save_id="id"),
                            version="1.0.0")
        return dcp_index.metadata(sd, st, save_id="id", version="1.0.0")

    buf = io.BytesIO()
    dcp_index.dump(build(False), buf)
    assert buf.getvalue() == pickle.dumps(build(True))
    assert pickle.loads(buf.getvalue()) == build(True)


@pytest.mark.parametrize("bias", [False, True])
def test_pieces_of_every_kind_are_its_tp1_tensor(bias):
    """GQA (3 groups of 2 query heads), a padded vocab: the rows streamed are the rows kind.shard builds."""
    shape = Shape(num_heads=6, num_groups=3, head_dim=4, vocab_size=250, padded_vocab_size=256)
    hidden, ffn = 16, 40
    tail = () if bias else (hidden,)
    cases = {
        QKV_KIND: [torch.randn((6 * 4,) + tail), torch.randn((3 * 4,) + tail), torch.randn((3 * 4,) + tail)],
        GATED_MLP: [torch.randn((ffn,) + tail), torch.randn((ffn,) + tail)],
        VOCAB: [torch.randn(250, hidden)],
        COLUMN: [torch.randn((ffn,) + tail)],
        ROW: [torch.randn(hidden, ffn)],
        REPLICATED: [torch.randn(hidden)],
    }
    for kind, tensors in cases.items():
        assert kind.name in torch_dist_writer._GLOBAL_PIECES
        pieces = pieces_of(kind, tensors, shape)
        assert torch.equal(torch.cat(pieces), kind.shard(tensors, 1, 0, shape)), kind.name
    with pytest.raises(ValueError, match="vocab_size=250"):
        pieces_of(VOCAB, [torch.randn(249, hidden)], shape)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("td_bytes")
    return make_llama(str(root / "hf"), seed=3, num_key_value_heads=2), root


def test_streamed_checkpoint_equals_the_torch_save_path(tiny_hf, monkeypatch):
    """Every file but the index (whose save id is random) is byte-identical to the torch.save path's, and the
    index loads to the same entries."""
    hf, root = tiny_hf
    fast, slow = str(root / "fast"), str(root / "slow")
    convert(hf, fast, ConvertOptions(format="torch_dist", tp=2, progress=False))
    monkeypatch.setattr(torch_dist_writer, "fast_archive", lambda dtype, shape: None)
    convert(hf, slow, ConvertOptions(format="torch_dist", tp=2, progress=False))
    it_fast, it_slow = os.path.join(fast, "release"), os.path.join(slow, "release")
    names = sorted(os.listdir(it_fast))
    assert names == sorted(os.listdir(it_slow)) and "__0_0.distcp" in names
    _, mismatch, errors = filecmp.cmpfiles(it_fast, it_slow, [n for n in names if n != ".metadata"], shallow=False)
    assert not mismatch and not errors
    md = [pickle.loads(open(os.path.join(d, ".metadata"), "rb").read()) for d in (it_fast, it_slow)]
    md[1].storage_meta.save_id = md[0].storage_meta.save_id
    assert md[0] == md[1]


def test_a_failed_write_surfaces_and_leaves_nothing(tiny_hf, monkeypatch):
    """An error in the writer thread (a full disk) is raised in the caller and the output folder never appears."""
    hf, root = tiny_hf
    calls = {"n": 0}
    real = torch_dist_writer._write_all

    def failing(fd, data):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(torch_dist_writer, "_write_all", failing)
    out = str(root / "full_disk")
    with pytest.raises(OSError, match="No space left"):
        convert(hf, out, ConvertOptions(format="torch_dist", progress=False))
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(root) if "full_disk" in n]


def test_global_shapes_by_arithmetic_equal_the_kinds_own_shard():
    """The reader checks each key's global shape by arithmetic (a meta `cat` would import sympy, ~3 s): it must
    equal what each kind's shard() builds, for every key of a model with every option."""
    import dataclasses

    from checkpoint_tools.canonical import CanonicalConfig, expected_shapes
    from megatron_bridge.layout import Arch, canonical_layer_names
    from megatron_bridge.torch_dist_keys import model_keys
    from megatron_bridge.torch_dist_reader import _GLOBAL_SHAPE, _expected_global_shape

    cfg = CanonicalConfig(hidden_size=48, intermediate_size=80, num_layers=3, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=250, head_dim=8, qkv_bias=True, o_bias=True,
                          mlp_bias=True, qk_norm=True, tie_word_embeddings=False)
    shape = Shape(num_heads=6, num_groups=2, head_dim=8, vocab_size=250, padded_vocab_size=256)
    shapes = expected_shapes(dataclasses.replace(cfg, qkv_bias=True, o_bias=True, mlp_bias=True))
    keys = model_keys(Arch(qkv_bias=True, linear_bias=True, qk_layernorm=True, untie=True))
    for dk in keys:
        assert dk.param.kind.name in _GLOBAL_SHAPE
        names = canonical_layer_names(dk.param.roles, 0) if dk.per_layer else list(dk.param.roles)
        built = dk.param.kind.shard([torch.zeros(shapes[n]) for n in names], 1, 0, shape).shape
        want = ((3,) if dk.per_layer else ()) + tuple(built)
        assert _expected_global_shape(dk, cfg, shape, 3) == want, dk.key


def test_qkv_parts_are_views_of_the_fused_tensor(tiny_hf):
    """get_parts hands q, k and v out as row blocks of the fused tensor (the HF writer streams them, no copy);
    they concatenate to get()'s tensors."""
    from megatron_bridge.torch_dist_reader import TorchDistSource

    hf, root = tiny_hf
    out = str(root / "parts")
    convert(hf, out, ConvertOptions(format="torch_dist", progress=False))
    src = TorchDistSource(out)
    try:
        for role in ("q", "k", "v"):
            name = f"model.layers.1.self_attn.{role}_proj.weight"
            parts = src.get_parts(name)
            assert len(parts) == 2  # one block per KV group
            fused = src._slice["global"]
            assert all(p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for p in parts)
            assert torch.equal(torch.cat(parts), src.get(name))
    finally:
        src.close()


def test_chunks_are_read_from_the_map_as_torch_load_reads_them(tiny_hf, monkeypatch):
    """The reader maps chunks whose archive is torch.save's (aligned data: a view of the file; unaligned: one copy)
    and must hand out exactly what torch.load of each archive gives."""
    import ctypes

    from megatron_bridge.torch_dist_reader import TorchDistSource

    hf, root = tiny_hf
    out = str(root / "mapped")
    convert(hf, out, ConvertOptions(format="torch_dist", tp=2, progress=False))
    md = pickle.loads((root / "mapped" / "release" / ".metadata").read_bytes())
    blob = (root / "mapped" / "release" / "__0_0.distcp").read_bytes()
    aligned = set()
    for i, info in md.storage_data.items():
        m = md.state_dict_metadata[i.fqn]
        if hasattr(m, "size"):
            chunk = blob[info.offset:info.offset + info.length]
            sizes = next(c.sizes for c in m.chunks if tuple(c.offsets) == tuple(i.offset))
            at = torch_save_blob.data_offset(memoryview(chunk), m.properties.dtype, tuple(sizes))
            assert at is not None, i.fqn  # every archive the writer wrote is recognised
            aligned.add((info.offset + at) % m.properties.dtype.itemsize == 0)
    assert aligned == {True, False}  # both ways of reading a mapped chunk are exercised
    mapped = TorchDistSource(out)
    try:
        got = {name: mapped.get(name).clone() for name in mapped.names()}
        mm = mapped._maps["__0_0.distcp"]
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        emb = mapped.get("model.embed_tokens.weight")
        assert base <= emb.data_ptr() < base + len(mm)  # a view of the file (this chunk's data is aligned)
        mapped.release()  # drops our maps; a tensor handed out keeps its own alive
        assert not mapped._maps and torch.equal(emb, got["model.embed_tokens.weight"])
        assert torch.equal(mapped.get("model.norm.weight"), got["model.norm.weight"])  # mapped anew
    finally:
        mapped.close()
    monkeypatch.setattr(torch_save_blob, "data_offset", lambda blob, dtype, shape: None)
    loaded = TorchDistSource(out)
    try:
        for name in loaded.names():
            b = loaded.get(name)
            assert got[name].dtype == b.dtype and torch.equal(got[name], b), name
        mm = loaded._maps["__0_0.distcp"]
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert not base <= loaded.get("model.embed_tokens.weight").data_ptr() < base + len(mm)  # torch.load's
    finally:
        loaded.close()
