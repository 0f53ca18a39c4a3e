"""Streaming safetensors: what we write is what `safetensors` reads, shards and index included; bad files fail."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_tools.safetensors_io import (CheckpointError, SafetensorsDir, SafetensorsFile, TensorSpec,
                                             write_tensors)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(300, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 100, (3, 4), generator=g),
        "d": torch.randn(64, 64, generator=g).to(torch.float16),
        "e": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("max_shard", [10**9, 1000])
def test_write_then_read_bit_exact(tmp_path, max_shard):
    ts = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    files = write_tensors(str(tmp_path), ts.items(), specs, max_shard_bytes=max_shard)
    if max_shard == 1000:
        assert len(files) > 1
        index = json.load(open(tmp_path / "model.safetensors.index.json"))
        assert set(index["weight_map"]) == set(ts)
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
        loaded = {}
        for f in files:  # the reference library reads every shard we wrote
            loaded.update(load_file(str(tmp_path / f)))
    else:
        assert files == ["model.safetensors"]
        loaded = load_file(str(tmp_path / "model.safetensors"))
    ours = SafetensorsDir(str(tmp_path))
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
        assert torch.equal(ours.get(k), v)


def test_writer_refuses_out_of_order_and_wrong_shape(tmp_path):
    from checkpoint_tools.safetensors_io import ShardedSafetensorsWriter
    w = ShardedSafetensorsWriter(str(tmp_path), [TensorSpec("x", (2,), torch.float32), TensorSpec("y", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected x, got y"):
        w.write("y", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        w.write("x", torch.zeros(3))
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_truncated_file_is_detected(tmp_path):
    ts = _tensors()
    write_tensors(str(tmp_path), ts.items(), [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()])
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(str(path))
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(str(path))


def test_missing_shard_is_named(tmp_path):
    ts = _tensors()
    files = write_tensors(str(tmp_path), ts.items(), [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()],
                          max_shard_bytes=1000)
    os.remove(tmp_path / files[1])
    with pytest.raises(CheckpointError, match=files[1]):
        SafetensorsDir(str(tmp_path))



def test_write_behind_keeps_order_and_reports_io_errors(tmp_path, monkeypatch):
    """The background writer: with a budget smaller than most tensors (so write() waits for the thread), every
    tensor still lands bit-exact in its planned shard; an I/O error in the thread is raised to the caller, not
    lost (here the output folder does not exist)."""
    import checkpoint_tools.safetensors_io as sio
    monkeypatch.setattr(sio, "WRITE_BEHIND_BYTES", 1000)
    g = torch.Generator().manual_seed(1)
    ts = {f"t{i}": torch.randn(50 + 37 * i, generator=g) for i in range(12)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    os.makedirs(tmp_path / "ok")
    files = write_tensors(str(tmp_path / "ok"), ts.items(), specs, max_shard_bytes=3000)
    assert len(files) > 2
    back = SafetensorsDir(str(tmp_path / "ok"))
    assert all(torch.equal(back.get(k), v) for k, v in ts.items())
    with pytest.raises(FileNotFoundError):
        write_tensors(str(tmp_path / "missing"), ts.items(), specs, max_shard_bytes=3000)


def test_write_parts_streams_blocks_as_one_tensor(tmp_path):
    """Row blocks (as TP shards hand them out, views and non-contiguous ones too) become the one tensor they
    concatenate to; blocks that do not add up to the planned tensor are refused before anything is written."""
    from checkpoint_tools.safetensors_io import ShardedSafetensorsWriter
    g = torch.Generator().manual_seed(1)
    big = torch.randn(10, 6, generator=g).to(torch.bfloat16)
    blocks = [big[:3], big[3:4], big.t().contiguous().t()[4:], ]  # the last is a non-contiguous view
    assert not blocks[2].is_contiguous()
    bias = torch.randn(8, generator=g)
    specs = [TensorSpec("w", (10, 6), torch.bfloat16), TensorSpec("b", (8,), torch.float32)]
    w = ShardedSafetensorsWriter(str(tmp_path), specs, max_shard_bytes=100)
    for bad, why in [([big[:3], big[3:9]], "planned"), ([big[:5], big[5:, :3]], "planned"),
                     ([big[:5].float(), big[5:]], "planned")]:
        with pytest.raises(ValueError, match=why):
            w.write_parts("w", bad)
    w.write_parts("w", blocks)
    w.write_parts("b", [bias[:2], bias[2:]])
    w.close()
    got = SafetensorsDir(str(tmp_path))
    assert torch.equal(got.get("w"), big) and torch.equal(got.get("b"), bias)


@pytest.mark.parametrize("rows", [1, 7, 3000])  # 3000 rows x 3 blocks: several vectored-write batches
def test_write_parts_side_by_side_column_blocks(tmp_path, rows):
    """Column blocks (a row-parallel weight's TP shards) become the tensor they concatenate to along dim 1, with no
    merged copy; blocks whose rows or dtype differ are refused."""
    from checkpoint_tools.safetensors_io import ShardedSafetensorsWriter
    g = torch.Generator().manual_seed(rows)
    blocks = [torch.randn(rows, c, generator=g).to(torch.bfloat16) for c in (4, 4, 8)]
    full = torch.cat(blocks, dim=1)
    specs = [TensorSpec("w", tuple(full.shape), torch.bfloat16), TensorSpec("tail", (3,), torch.float32)]
    w = ShardedSafetensorsWriter(str(tmp_path), specs)
    with pytest.raises(ValueError, match="planned"):
        w.write_parts("w", [blocks[0], blocks[1][:-1] if rows > 1 else blocks[1].float(), blocks[2]], dim=1)
    w.write_parts("w", [blocks[0], blocks[1].t().contiguous().t(), blocks[2]], dim=1)  # a non-contiguous block too
    w.write("tail", torch.arange(3.0))
    w.close()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["w"], full) and torch.equal(got["tail"], torch.arange(3.0))
