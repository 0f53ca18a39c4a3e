"""Canonical tensors -> a Megatron torch_dist checkpoint, written by one process, one tensor in memory at a time.

megatron-core reshards a torch_dist checkpoint at load (it checks keys and global shapes, then reads whatever
chunks cover what each rank needs), so any valid chunking of the global tensors is a checkpoint it loads at every
TP/PP. This writer emits one chunk per layer per key (the layer's TP=1 tensor; see torch_dist_keys), each a
`torch.save` blob appended to a `__0_N.distcp` file exactly as PyTorch DCP's FileSystemWriter stores a chunk, then
the DCP index `.metadata` (a pickled `Metadata` of plain DCP classes), `common.pt` (args, checkpoint_version,
iteration, content_metadata, as megatron-core's `dist_checkpointing.save` writes it) and `metadata.json`. Peak
memory is one layer's tensor of one key, not a rank's shard, and no megatron-core process is started.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import uuid
from typing import Optional

import torch
from tqdm import tqdm

from checkpoint_tools.atomic_dir import atomic_directory
from checkpoint_tools.canonical import TensorSource, expected_shapes
from megatron_bridge import legacy_format, sidecar
from megatron_bridge.layout import canonical_layer_names, stage_layers
from megatron_bridge.megatron_args import arch_from_args, parallel_sizes, shape_from_args
from megatron_bridge.param_kinds import check_tp
from megatron_bridge.to_megatron import _canonical, check_canonical_fits
from megatron_bridge.torch_dist_format import CONTENT_METADATA
from megatron_bridge.torch_dist_keys import DistKey, extra_state_keys, model_keys

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
    """Appends `torch.save` blobs to `__0_N.distcp` files, starting the next file past `max_file_bytes`."""

    def __init__(self, it_dir: str, max_file_bytes: int):
        self.it_dir, self.max_file_bytes = it_dir, max_file_bytes
        self._file, self._name, self._count = None, None, 0

    def _target(self):
        if self._file is None or self._file.tell() >= self.max_file_bytes:
            self.close()
            self._name = f"__0_{self._count}.distcp"
            self._count += 1
            self._file = open(os.path.join(self.it_dir, self._name), "wb")
        return self._file

    def write_tensor(self, tensor: torch.Tensor):
        """Store one chunk as DCP does (torch.save of the chunk alone) and return where it went."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        f = self._target()
        start = f.tell()
        torch.save(tensor, f)
        return _StorageInfo(relative_path=self._name, offset=start, length=f.tell() - start)

    def write_bytes(self, data: bytes):
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        f = self._target()
        start = f.tell()
        f.write(data)
        return _StorageInfo(relative_path=self._name, offset=start, length=len(data))

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage: a view (of a memory-mapped file, of a fused tensor) is copied to
    a tensor of its own, so the blob holds exactly the chunk."""
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0
    return t if whole and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _global_tensor(source: TensorSource, dk: DistKey, layer: Optional[int], shape, shapes: dict,
                   dtype: torch.dtype) -> torch.Tensor:
    """The global (TP=1) tensor of `dk` for one layer (or the whole tensor of a non-layer key)."""
    if dk.per_layer:
        tensors = [_canonical(source, n, shapes) for n in canonical_layer_names(dk.param.roles, layer)]
    else:
        tensors = [source.get(dk.param.roles[0])]
    tensors = [t.to(dtype) if t.dtype != dtype else t for t in tensors]
    return _own_storage(dk.param.kind.shard(tensors, 1, 0, shape))


def write_torch_dist(source: TensorSource, dst: str, args: argparse.Namespace, *, iteration: Optional[int] = None,
                     family: Optional[str] = None, hf_config: Optional[dict] = None,
                     assets_from: Optional[str] = None, copy_sidecar_from: Optional[str] = None,
                     record_config: bool = True, force: bool = False, progress: bool = True,
                     max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """Write `source` as a torch_dist checkpoint at `dst` (atomically) whose args say the layout in `args`."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

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
        try:
            for dk in keys:
                chunks, global_size = [], None
                for layer in (range(n_layers) if dk.per_layer else [None]):
                    t = _global_tensor(source, dk, layer, shape, shapes, dtype)
                    offsets = (layer,) + (0,) * t.dim() if dk.per_layer else (0,) * t.dim()
                    if dk.per_layer:
                        t = t.unsqueeze(0)
                        global_size = (n_layers,) + tuple(t.shape[1:])
                    else:
                        global_size = tuple(t.shape)
                    storage[MetadataIndex(dk.key, offsets)] = files.write_tensor(t)
                    chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape))
                    del t
                    source.release()  # the source's pages of this tensor are done with (memory-mapped input)
                    bar.update()
                state_md[dk.key] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(global_size),
                                                         chunks)
            buf = io.BytesIO()
            # megatron-core saves a byte object as the list of its local values: a local-spec linear layer's extra
            # state is None, stored as [None]
            torch.save([None], buf)
            for key in extra_state_keys(n_layers):
                storage[MetadataIndex(key)] = files.write_bytes(buf.getvalue())
                state_md[key] = BytesStorageMetadata()
        finally:
            files.close()
            bar.close()
        md = Metadata(state_dict_metadata=state_md, storage_data=storage,
                      storage_meta=StorageMeta(save_id=str(uuid.uuid4())), version=DCP_VERSION)
        with open(os.path.join(it_dir, ".metadata"), "wb") as f:
            pickle.dump(md, f)
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
