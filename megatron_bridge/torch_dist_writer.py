"""Canonical tensors -> a Megatron torch_dist checkpoint, written by one process, one tensor in memory at a time.

megatron-core reshards a torch_dist checkpoint at load (it checks keys and global shapes, then reads whatever
chunks cover what each rank needs), so any valid chunking of the global tensors is a checkpoint it loads at every
TP/PP. This writer emits one chunk per layer per key (the layer's TP=1 tensor; see torch_dist_keys), each a
`torch.save` blob appended to a `__0_N.distcp` file exactly as PyTorch DCP's FileSystemWriter stores a chunk, then
the DCP index `.metadata` (a pickled `Metadata` of plain DCP classes), `common.pt` (args, checkpoint_version,
iteration, content_metadata, as megatron-core's `dist_checkpointing.save` writes it) and `metadata.json`. Peak
memory is one layer's tensor of one key, not a rank's shard, and no megatron-core process is started.

At the I/O floor: a chunk's bytes go from the source's memory (a memory-mapped file, mostly) to the file without a
copy of our own: the fused tensors (QKV, gate+up) are written as their row pieces, the archive around them by
torch_save_blob (torch.save's bytes, CRC-32 by checkpoint_tools.crc32), a writer thread writing while this one CRCs
the next slice; the index is pickled from stand-ins (dcp_index), so torch.distributed.checkpoint is never imported.
The bytes are those the torch.save path wrote (tests/test_torch_dist_bytes.py compares them).
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from tqdm import tqdm

from checkpoint_tools.atomic_dir import atomic_directory
from checkpoint_tools.crc32 import crc32
from checkpoint_tools.canonical import TensorSource, expected_shapes
from megatron_bridge import dcp_index, legacy_format, sidecar
from megatron_bridge.layout import canonical_layer_names, stage_layers
from megatron_bridge.megatron_args import arch_from_args, parallel_sizes, shape_from_args
from megatron_bridge.param_kinds import VocabParallel, check_tp
from megatron_bridge.to_megatron import _canonical, check_canonical_fits
from megatron_bridge.torch_dist_format import CONTENT_METADATA
from megatron_bridge.torch_dist_keys import DistKey, extra_state_keys, model_keys
from megatron_bridge.torch_save_blob import fast_archive

# As megatron-core 0.16.1 writes it (dist_checkpointing.save with the torch_dist and torch common backends).
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION in torch 2.13
# Files stay a size a file system and a parallel reader handle well; a bigger single tensor gets a file of its own.
DEFAULT_MAX_FILE_BYTES = 1024**3


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype megatron-core builds the model's parameters in (model_builder.transformer_config's rule), which is
    the dtype megatron-core's own save would have written."""
    dtype = getattr(args, "params_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class DcpFiles:
    """Appends `torch.save` archives to `__0_N.distcp` files, starting the next file past `max_file_bytes`.

    A tensor is streamed from its pieces (torch_save_blob writes the archive torch.save would, CRC-ing each slice of
    the bytes in this thread with checkpoint_tools.crc32, which releases the GIL) while one writer thread writes the
    previous slices: the CRC of one slice overlaps the write of the last, and no piece is copied into a tensor of its
    own. The pieces are views (of memory-mapped source files, mostly); the queue holds a few slices, so memory stays
    flat."""

    SLICE = 16 << 20
    IN_FLIGHT = 4  # slices queued for the writer thread at most

    def __init__(self, it_dir: str, max_file_bytes: int):
        self.it_dir, self.max_file_bytes = it_dir, max_file_bytes
        self._fd, self._name, self._count, self._pos = None, None, 0, 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distcp-writer")
        self._pending: deque = deque()

    def _submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.IN_FLIGHT:
            self._pending.popleft().result()  # re-raises the writer thread's error here

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _target(self) -> int:
        if self._fd is None or self._pos >= self.max_file_bytes:
            self._close_file()
            self._name = f"__0_{self._count}.distcp"
            self._count += 1
            self._fd = os.open(os.path.join(self.it_dir, self._name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._pos = 0
        return self._fd

    def _info(self, start: int):
        return dcp_index.storage_info(self._name, start, self._pos - start)

    def write_pieces(self, dtype: torch.dtype, shape: tuple, pieces: list[torch.Tensor]):
        """Store one chunk (the dim-0 concatenation of `pieces`, of `shape`) exactly as `torch.save` of it alone
        would, and return where it went."""
        arch = fast_archive(dtype, shape)
        if arch is None:  # an archive this module does not write (past 4 GB, another torch): torch.save writes it
            return self._torch_save(_own_storage(torch.cat(pieces) if len(pieces) > 1 else pieces[0]).reshape(shape))
        fd, start = self._target(), self._pos
        self._submit(_write_all, fd, arch.head)
        crc, n = 0, 0
        for piece in pieces:
            data = _bytes_of(piece)
            for at in range(0, len(data), self.SLICE):
                part = data[at:at + self.SLICE]
                crc = crc32(part, crc)
                self._submit(_write_all, fd, part)
            n += len(data)
        if n != arch.data_len:
            raise AssertionError(f"pieces of {n} bytes for a {list(shape)} {dtype} chunk of {arch.data_len}")
        self._submit(_write_all, fd, arch.tail(crc))
        self._pos += arch.total_len
        return self._info(start)

    def _torch_save(self, tensor: torch.Tensor):
        fd, start = self._target(), self._pos
        self._drain()
        with os.fdopen(os.dup(fd), "wb") as f:
            f.seek(start)
            torch.save(tensor, f)
            self._pos = f.tell()
        return self._info(start)

    def write_bytes(self, data: bytes):
        fd, start = self._target(), self._pos
        self._submit(_write_all, fd, data)
        self._pos += len(data)
        return self._info(start)

    def _close_file(self) -> None:
        if self._fd is not None:
            # Closed by the writer thread after its last write; not fsynced here: atomic_directory fsyncs every
            # file before the rename, and an fsync per file stalled the one writer thread for each file's flush.
            self._submit(os.close, self._fd)
            self._fd = None

    def close(self) -> None:
        try:
            self._close_file()
            self._drain()
        finally:
            self._pool.shutdown(wait=True)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in place (a copy only when it is not contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage: a view (of a memory-mapped file, of a fused tensor) is copied to
    a tensor of its own, so the blob holds exactly the chunk."""
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0
    return t if whole and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _qkv_pieces(tensors, shape) -> list[torch.Tensor]:
    """[q_g0, k_g0, v_g0, q_g1, ...]: the rows of QKV.shard at TP=1, as views."""
    q, k, v = tensors
    per, hd = shape.num_heads // shape.num_groups, shape.head_dim
    out = []
    for g in range(shape.num_groups):
        out += [q[g * per * hd:(g + 1) * per * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    return out


def _vocab_pieces(tensors, shape) -> list[torch.Tensor]:
    t = tensors[0]
    VocabParallel._check(t, 1, shape)  # the rows the config implies, a padded vocab that fits
    pad = shape.padded_vocab_size - t.shape[0]
    return [t, t.new_zeros((pad,) + tuple(t.shape[1:]))] if pad else [t]


# A global (TP=1) tensor as pieces whose dim-0 concatenation is `kind.shard(tensors, 1, 0, shape)`, the rows in
# place (the reader's _FROM_GLOBAL is the inverse). A kind not listed is built whole by its shard().
_GLOBAL_PIECES = {
    "replicated": lambda tensors, shape: [tensors[0]],
    "column": lambda tensors, shape: [tensors[0]],
    "row": lambda tensors, shape: [tensors[0]],
    "qkv": _qkv_pieces,
    "gated_mlp": lambda tensors, shape: list(tensors),
    "vocab": _vocab_pieces,
}


def global_pieces(source: TensorSource, dk: DistKey, layer: Optional[int], shape, shapes: dict,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """The global (TP=1) tensor of `dk` for one layer (or the whole tensor of a non-layer key), as row pieces."""
    if dk.per_layer:
        tensors = [_canonical(source, n, shapes) for n in canonical_layer_names(dk.param.roles, layer)]
    else:
        tensors = [source.get(dk.param.roles[0])]
    return pieces_of(dk.param.kind, [t.to(dtype) if t.dtype != dtype else t for t in tensors], shape)


def pieces_of(kind, tensors: list[torch.Tensor], shape) -> list[torch.Tensor]:
    """`kind.shard(tensors, 1, 0, shape)` as dim-0 pieces (views where the kind allows)."""
    pieces = _GLOBAL_PIECES.get(kind.name)
    return pieces(tensors, shape) if pieces else [kind.shard(tensors, 1, 0, shape)]


def write_torch_dist(source: TensorSource, dst: str, args: argparse.Namespace, *, iteration: Optional[int] = None,
                     family: Optional[str] = None, hf_config: Optional[dict] = None,
                     assets_from: Optional[str] = None, copy_sidecar_from: Optional[str] = None,
                     record_config: bool = True, force: bool = False, progress: bool = True,
                     max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """Write `source` as a torch_dist checkpoint at `dst` (atomically) whose args say the layout in `args`."""
    cfg = source.config
    tp, pp, vpp = parallel_sizes(args)
    shape = shape_from_args(args, cfg.vocab_size)
    check_tp(tp, shape, cfg.intermediate_size)  # the layout the args record must load in megatron-core
    stage_layers(cfg.num_layers, pp, vpp)
    arch = arch_from_args(args)
    check_canonical_fits(source, arch)
    keys = model_keys(arch)
    shapes = expected_shapes(cfg)
    dtype = params_dtype(args)
    n_layers = cfg.num_layers
    args = argparse.Namespace(**vars(args))
    args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    with atomic_directory(dst, force=force) as tmp:
        it_dir = os.path.join(tmp, legacy_format.iteration_dir_name(iteration))
        os.makedirs(it_dir)
        files = DcpFiles(it_dir, max_file_bytes)
        state_md, storage = {}, {}
        bar = tqdm(total=sum(n_layers if dk.per_layer else 1 for dk in keys), unit="tensor", disable=not progress,
                   desc=f"writing {os.path.basename(os.path.abspath(dst))}")
        gc_was_on = gc.isenabled()
        gc.disable()  # the loop makes no cycles; the collector only rescans the heap (several % of the time)
        try:
            for dk in keys:
                chunks, global_size = [], None
                for layer in (range(n_layers) if dk.per_layer else [None]):
                    pieces = global_pieces(source, dk, layer, shape, shapes, dtype)
                    size = (sum(p.shape[0] for p in pieces),) + tuple(pieces[0].shape[1:])
                    if dk.per_layer:
                        offsets, size = (layer,) + (0,) * len(size), (1,) + size
                        global_size = (n_layers,) + size[1:]
                    else:
                        offsets, global_size = (0,) * len(size), size
                    storage[dcp_index.index(dk.key, offsets)] = files.write_pieces(dtype, size, pieces)
                    chunks.append(dcp_index.chunk(offsets, size))
                    del pieces
                    source.release()  # the source's pages of this tensor are done with (memory-mapped input)
                    bar.update()
                state_md[dk.key] = dcp_index.tensor_metadata(dtype, global_size, chunks)
            buf = io.BytesIO()
            # megatron-core saves a byte object as the list of its local values: a local-spec linear layer's extra
            # state is None, stored as [None]
            torch.save([None], buf)
            for key in extra_state_keys(n_layers):
                storage[dcp_index.index(key)] = files.write_bytes(buf.getvalue())
                state_md[key] = dcp_index.bytes_metadata()
        finally:
            try:
                files.close()
            finally:
                bar.close()
                if gc_was_on:
                    gc.enable()
        md = dcp_index.metadata(state_md, storage, save_id=str(uuid.uuid4()), version=DCP_VERSION)
        with open(os.path.join(it_dir, ".metadata"), "wb") as f:
            dcp_index.dump(md, f)
        common = {"args": args, "checkpoint_version": legacy_format.CHECKPOINT_VERSION,
                  "iteration": iteration or 0, "content_metadata": dict(CONTENT_METADATA)}
        torch.save(common, os.path.join(it_dir, "common.pt"))
        with open(os.path.join(it_dir, "metadata.json"), "w") as f:
            json.dump(METADATA_JSON, f)
        legacy_format.write_tracker(tmp, iteration)
        if copy_sidecar_from:
            sidecar.copy_sidecar(copy_sidecar_from, tmp)
            data = sidecar.read_sidecar(tmp)
            if data is not None:  # the source's record (family, HF config, tokenizer files), with this config
                sidecar.write_sidecar(tmp, cfg, family=data.get("family"), hf_config=data.get("source_hf_config"),
                                      name_style="local")
        elif record_config:
            sidecar.write_sidecar(tmp, cfg, family=family, hf_config=hf_config, name_style="local",
                                  assets_from=assets_from)
    return dst
