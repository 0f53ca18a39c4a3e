"""Our torch zip writer (megatron_bridge/rank_file_writer.py) against every reader of rank files: torch.load
(weights-only, memory-mapped, and with torch computing record offsets itself), our trust-policy loader, the
torch-free pickle_peek and the CRC check. Also: a view is written as its own bytes, not its storage; a streamed rank
holds a few tensors at a time; zip64 records (forced with a low threshold) read back; a flipped byte is caught."""
from __future__ import annotations

import argparse
import gc
import os
import threading
import weakref
import zipfile

import pytest
import torch
import torch.utils.serialization as torch_serialization

from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.pickle_peek import TensorRecord, peek_torch_file
from checkpoint_tools.zip_integrity import check_zip_crc
from conftest import make_llama
from megatron_bridge import legacy_format, to_megatron
from megatron_bridge.convert import ConvertOptions, hf_to_megatron
from megatron_bridge.from_megatron import MegatronSource
from megatron_bridge.param_kinds import COLUMN, GATED_MLP, QKV_KIND, REPLICATED, ROW, VOCAB, Shape
from megatron_bridge.rank_file_writer import ALIGNMENT, Columns, RankFileWriter, write_torch_file
from megatron_bridge.safe_load import safe_torch_load


def _payload() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 24, generator=g)  # one storage many pieces view
    args = argparse.Namespace(num_layers=2, hidden_size=24, params_dtype=torch.bfloat16, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=2)
    chunk0 = {
        "rows_view": base[8:16],  # contiguous view at a storage offset (a column-parallel split)
        "cols_view": base[:, 5:17],  # not contiguous (a row-parallel split)
        "transposed": base.t(),
        "bf16": base[:4].to(torch.bfloat16),
        "fp16": base[4:6].to(torch.float16),
        "int64": torch.arange(7),
        "int32_view": torch.arange(30, dtype=torch.int32)[10:20],
        "uint8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "float8": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn),  # torch.save's _rebuild_tensor_v3 path
        "uint16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 24),
        "empty_view": base[3:3],
        "extra_state": None,  # Transformer Engine's _extra_state
    }
    shared = torch.randn(3, 3, generator=g)
    chunk1 = {"weight": base[-1], "shared_a": shared, "shared_b": shared, "extra_state": None}
    return legacy_format.rank_payload(args, None, [chunk0, chunk1])


def _assert_same(got, want, where=""):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert got.stride() == want.contiguous().stride(), where
        # bit-exact (float8 has no equality kernel): compare the raw bytes of non-empty tensors
        if want.numel():
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)), where
    elif isinstance(want, argparse.Namespace):
        assert vars(got) == vars(want), where
    else:
        assert got == want and type(got) is type(want), where


def _torch_load(path, **kw):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, **kw)


@pytest.mark.parametrize("threads", [True, False])
# zip64 fields as miniz writes them past 4 GiB, forced on small files: on every record (0), or from 3000 bytes on
# (a large record near the start gets the size fields, later ones the offset field).
@pytest.mark.parametrize("zip64_limit", [None, 0, 3000], ids=["plain", "zip64_all", "zip64_sizes_or_offsets"])
def test_every_reader_gets_back_what_was_written(tmp_path, zip64_limit, threads):
    payload = _payload()
    path = str(tmp_path / "model_optim_rng.pt")
    options = {"threads": threads} | ({} if zip64_limit is None else {"zip64_limit": zip64_limit})
    write_torch_file(path, payload, **options)

    check_zip_crc(path)
    for loaded in (_torch_load(path), _torch_load(path, mmap=True), safe_torch_load(path)):
        _assert_same(loaded, payload)
    # torch may compute record offsets from miniz's layout rules instead of reading headers (.format_version 1):
    # with its debug asserts it checks every computed offset against the header's.
    names = zipfile.ZipFile(path).namelist()
    assert ("model_optim_rng/.format_version" in names) == (zip64_limit is None)
    old = torch_serialization.config.load.calculate_storage_offsets
    os.environ["TORCH_SERIALIZATION_DEBUG"] = "1"
    torch_serialization.config.load.calculate_storage_offsets = True
    try:
        _assert_same(_torch_load(path, mmap=True), payload)
    finally:
        torch_serialization.config.load.calculate_storage_offsets = old
        del os.environ["TORCH_SERIALIZATION_DEBUG"]

    peeked = peek_torch_file(path)
    record = peeked["model0"]["rows_view"]
    assert isinstance(record, TensorRecord) and record.shape == (8, 24) and str(record.dtype) == "torch.float32"
    assert str(peeked["model0"]["float8"].dtype) == "torch.float8_e4m3fn"
    assert peeked["model1"]["extra_state"] is None and peeked["args"].hidden_size == 24


def test_views_are_written_as_their_own_bytes_at_aligned_offsets(tmp_path):
    big = torch.randn(1000, 256)  # 1 MB storage; the view is 1 KB of it
    path = str(tmp_path / "x.pt")
    write_torch_file(path, {"row": big[500], "cols": big[:4, :2]})
    z = zipfile.ZipFile(path)
    sizes = {i.filename: i.file_size for i in z.infolist() if "/data/" in i.filename}
    assert sizes == {"x/data/0": 256 * 4, "x/data/1": 8 * 4}
    assert os.path.getsize(path) < 4096
    with open(path, "rb") as f:
        raw = f.read()
    for info in z.infolist():  # torch.load(mmap=True) maps records in place: data at multiples of 64
        name_len, extra_len = (int.from_bytes(raw[info.header_offset + o:info.header_offset + o + 2], "little")
                               for o in (26, 28))
        assert (info.header_offset + 30 + name_len + extra_len) % ALIGNMENT == 0, info.filename
    loaded = _torch_load(path, mmap=True)
    assert torch.equal(loaded["row"], big[500]) and loaded["row"].storage_offset() == 0
    assert loaded["row"].untyped_storage().nbytes() == 256 * 4


def test_a_flipped_byte_in_a_record_fails_the_crc_check(tmp_path):
    path = str(tmp_path / "model_optim_rng.pt")
    write_torch_file(path, {"w": torch.arange(4096, dtype=torch.float32)})
    info = zipfile.ZipFile(path).getinfo("model_optim_rng/data/0")
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 200)  # inside the data (header + padding is 64 bytes)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match="checksum mismatch in record model_optim_rng/data/0"):
        check_zip_crc(path)


def test_a_streamed_rank_holds_a_few_tensors_not_the_rank(tmp_path):
    """save_rank_streamed with a generator of fresh 1 MB tensors and 1 MB allowed in flight: at most a few are alive
    at once (the writer frees each once written), and the file loads as the dict of all of them."""
    alive: weakref.WeakSet = weakref.WeakSet()
    most = 0
    n, args = 12, argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)

    def tensors():
        nonlocal most
        for i in range(n):
            gc.collect()
            most = max(most, len(alive))
            t = torch.full((256, 1024), float(i))
            alive.add(t)
            yield 0, f"layer{i}.weight", t

    path = legacy_format.save_rank_streamed(str(tmp_path), None, 0, 0, args, tensors(), max_in_flight=1 << 20)
    assert most <= 3, most
    legacy_format.write_tracker(str(tmp_path), None)
    loaded = legacy_format.load_rank(str(tmp_path), 0, 0)
    assert list(loaded["model"]) == [f"layer{i}.weight" for i in range(n)]
    assert all(torch.equal(loaded["model"][f"layer{i}.weight"], torch.full((256, 1024), float(i))) for i in range(n))
    assert path.endswith(os.path.join("release", "mp_rank_00", "model_optim_rng.pt"))


def test_rank_files_written_together_are_the_bytes_of_each_written_alone(tmp_path):
    """save_ranks_streamed takes one tensor of each rank in turn (stages of different lengths, a None entry) with
    the in-flight budget shared: each file holds, record for record, the bytes save_rank_streamed writes for that
    rank alone (but torch.save's random serialization id), the paths come back in the ranks' order and progress
    counts every tensor once."""
    args = argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)

    def items(t, p):
        for i in range(3 + 2 * p):
            yield 0, f"layers.{i}.weight", torch.full((64, 32 + t), float(10 * t + p + i))
        yield 0, "layers.0._extra_state", None

    ranks = [(t, p) for p in range(2) for t in range(2)]
    seen = []
    paths = legacy_format.save_ranks_streamed(str(tmp_path / "together"), None, args,
                                              {r: items(*r) for r in ranks}, on_tensor=lambda: seen.append(1),
                                              max_in_flight=1 << 14)
    assert len(seen) == 2 * 3 + 2 * 5
    for (t, p), path in zip(ranks, paths):
        alone = legacy_format.save_rank_streamed(str(tmp_path / "alone"), None, t, p, args, items(t, p))
        assert path.endswith(os.path.join("release", f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"))
        with zipfile.ZipFile(path) as a, zipfile.ZipFile(alone) as b:
            assert a.namelist() == b.namelist(), (t, p)
            for record in a.namelist():  # the same records in the same order; only the random id is per file
                if not record.endswith(".data/serialization_id"):
                    assert a.read(record) == b.read(record), (t, p, record)


def test_what_the_writer_cannot_store_is_refused_by_name(tmp_path):
    with RankFileWriter(str(tmp_path / "x.pt")) as w:
        with pytest.raises(TypeError, match="x.pt: add\\(\\) takes a tensor or a list of tensors, got int"):
            w.add([1, 2])
        with pytest.raises(ValueError, match="x.pt: cannot write a Tensor with layout torch.sparse_coo"):
            w.add(torch.eye(3).to_sparse())


@pytest.mark.parametrize("kind,heads,groups,tp", [(GATED_MLP, 8, 2, 1), (GATED_MLP, 8, 2, 4), (QKV_KIND, 8, 2, 1),
                                                  (QKV_KIND, 8, 2, 2), (QKV_KIND, 8, 2, 4), (QKV_KIND, 6, 1, 2),
                                                  (QKV_KIND, 8, 8, 4), (COLUMN, 8, 2, 2), (ROW, 8, 2, 2)])
def test_shard_parts_are_source_views_that_write_as_the_split_piece(tmp_path, kind, heads, groups, tp):
    """A converter hands the writer each rank's piece as row blocks (Kind.shard_parts): their concatenation is
    `split(...)[rank]`, fused QKV and gate+up blocks are views of the inputs (nothing concatenated in memory), and
    the record written from the blocks loads as that piece."""
    hd, hidden = 4, 16
    shape = Shape(num_heads=heads, num_groups=groups, head_dim=hd)
    g = torch.Generator().manual_seed(1)
    sizes = {QKV_KIND: [heads * hd, groups * hd, groups * hd], GATED_MLP: [32, 32]}.get(kind, [32])
    inputs = [torch.randn(n, hidden, generator=g).to(torch.bfloat16) for n in sizes]
    pointers = {t.untyped_storage().data_ptr() for t in inputs}
    with RankFileWriter(str(tmp_path / "x.pt")) as w:
        refs = {}
        for rank in range(tp):
            parts = kind.shard_parts(inputs, tp, rank, shape)
            if kind is not ROW:
                assert all(p.untyped_storage().data_ptr() in pointers for p in parts)
            refs[rank] = w.add(parts)
        w.finish(refs)
    loaded = _torch_load(str(tmp_path / "x.pt"), mmap=True)
    for rank, want in enumerate(kind.split(inputs, tp, shape)):
        _assert_same(loaded[rank], want, f"rank {rank}")
        assert torch.equal(kind.shard(inputs, tp, rank, shape), want)


def test_row_blocks_that_do_not_concatenate_are_refused(tmp_path):
    with RankFileWriter(str(tmp_path / "x.pt")) as w:
        with pytest.raises(ValueError, match=r"x.pt: row blocks \[\(2, 3\), \(2, 4\)\] .* do not concatenate"):
            w.add([torch.zeros(2, 3), torch.zeros(2, 4)])


@pytest.mark.parametrize("kind,sizes,tp", [(QKV_KIND, [32, 8, 8], 1), (QKV_KIND, [32, 8, 8], 4), (GATED_MLP, [32, 32], 2),
                                           (COLUMN, [32], 4), (VOCAB, [30], 2), (REPLICATED, [32], 2)])
def test_resharding_takes_rows_from_the_source_blocks_without_merging(kind, sizes, tp):
    """Resharding a Megatron checkpoint hands each canonical tensor over as its source TP shards' row blocks
    (to_megatron._shard): the piece built from them equals split() of the merged tensor, and every block of it is
    a view of a source block, except vocabulary padding (new zero rows: built from the merged tensor)."""
    shape = Shape(num_heads=8, num_groups=2, head_dim=4, vocab_size=30, padded_vocab_size=32)
    g = torch.Generator().manual_seed(2)
    whole = [torch.randn(n, 6, generator=g) for n in sizes]
    cuts = [[t[:3], t[3:n // 2], t[n // 2:]] for t, n in zip(whole, sizes)]  # uneven blocks, as from TP shards
    pointers = {t.untyped_storage().data_ptr() for t in whole}
    for rank in range(tp):
        blocks = to_megatron._shard(kind, cuts, tp, rank, shape)
        assert torch.equal(torch.cat(blocks), kind.split(whole, tp, shape)[rank])
        if kind is not VOCAB:
            assert all(b.untyped_storage().data_ptr() in pointers for b in blocks)


def test_a_failure_while_streaming_stops_the_writer_without_writing_the_rest(tmp_path):
    """The caller's error propagates as is, the writer's threads stop, and tensors still queued are not written."""
    def tensors():
        for i in range(3):
            yield 0, f"w{i}", torch.full((1024, 256), float(i))
        raise ValueError("source broke")

    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    with pytest.raises(ValueError, match="source broke"):
        legacy_format.save_rank_streamed(str(tmp_path), None, 0, 0, args, tensors())
    path = tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt"
    assert path.stat().st_size <= 3 * 1024 * 1024 + 4096  # at most the records already handed over, no pickle
    assert not any(t.name.startswith(("rank-file-writer", "crc32")) for t in threading.enumerate())


@pytest.mark.parametrize("threads", [True, False])
def test_column_blocks_are_written_row_by_row_as_their_concatenation(tmp_path, threads):
    """A row-parallel piece handed over as column blocks (Columns): a column slice of a matrix as it is, and the TP
    shards of a row-parallel weight side by side, big enough for many writev calls, load as torch.cat(dim=1)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3000, 64, generator=g).to(torch.bfloat16)
    shards = [torch.randn(3000, n, generator=g).to(torch.bfloat16) for n in (40, 24)]
    pieces = {"slice": Columns([weight[:, 16:48]]), "merged": Columns(shards),
              "slice_and_shard": Columns([weight[:, :8], shards[1]]), "empty_cols": Columns([weight[:, 5:5]])}
    path = str(tmp_path / "x.pt")
    with RankFileWriter(path, threads=threads) as w:
        w.finish({k: w.add(v) for k, v in pieces.items()})
    check_zip_crc(path)
    for loaded in (_torch_load(path, mmap=True), safe_torch_load(path)):
        for k, blocks in pieces.items():
            _assert_same(loaded[k], torch.cat(list(blocks), dim=1), k)
    with RankFileWriter(str(tmp_path / "y.pt")) as w:
        with pytest.raises(ValueError, match=r"column blocks \[\(3000, 40\), \(2, 24\)\] .* along dim 1"):
            w.add(Columns([shards[0], shards[1][:2]]))


def test_resharded_pieces_are_views_of_the_source_rank_files(tmp_path):
    """Megatron TP=2 -> TP=1 and TP=4 (rank_tensors over a real MegatronSource): every piece of a column-parallel,
    fused or row-parallel weight is made of views of the memory-mapped source rank files (nothing merged), except
    the vocabulary-parallel ones, and equals the piece a direct conversion from Hugging Face gives."""
    hf = make_llama(str(tmp_path / "hf"), num_attention_heads=8, num_key_value_heads=2)
    tp2 = str(tmp_path / "tp2")
    hf_to_megatron(hf, tp2, ConvertOptions(tp=2, progress=False))
    ckpt = legacy_format.open_legacy(tp2)
    source = MegatronSource(ckpt)
    mapped = [t.untyped_storage() for r in ckpt.ranks.values() for t in r["model"].values() if t is not None]
    spans = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in mapped]
    for tp in (1, 4):
        direct = str(tmp_path / f"direct_tp{tp}")
        hf_to_megatron(hf, direct, ConvertOptions(tp=tp, progress=False))
        args = legacy_format.open_legacy(direct).args
        for rank in range(tp):
            want = legacy_format.load_rank(direct, rank, 0)["model"]
            for _, name, blocks in to_megatron.rank_tensors(source, args, "local", rank, 0):
                dim = 1 if isinstance(blocks, Columns) else 0
                assert torch.equal(torch.cat(list(blocks), dim=dim), want[name]), (tp, rank, name)
                if "linear" in name and "norm" not in name:
                    assert all(any(a <= b.data_ptr() < z for a, z in spans) for b in blocks), (tp, name)
