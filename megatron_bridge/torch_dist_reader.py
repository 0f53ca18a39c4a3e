"""A Megatron torch_dist checkpoint as canonical tensors, read by one process, one layer of one key at a time.

Every global key is matched against the key table (torch_dist_keys) up front, from the DCP index alone: a model key
the args do not imply, or that no GPT model has, is an error (never dropped silently); optimizer, RNG and extra
state are recognised by name, skipped and reported; each model key's chunks must tile its global tensor exactly
(in bounds, no overlap, no gap) and have a storage entry. Only then are tensors read: a canonical tensor is cut from
its key's layer slice, assembled from the chunks that cover it, each chunk a `torch.save` blob read by byte range and
loaded weights-only through the trust policy (scanned first). Which TP/PP wrote the checkpoint does not matter.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import mmap
import os
from collections import Counter
from typing import Optional

import torch

from checkpoint_tools.canonical import CanonicalConfig, TensorSource, expected_shapes, expected_tensor_names
from checkpoint_tools.errors import CheckpointError
from checkpoint_tools.pickle_peek import TorchName, is_stand_in
from checkpoint_tools.pickle_trust import PolicyLike, load_torch_stream, trust_policy
from megatron_bridge import torch_dist_format, torch_save_blob
from megatron_bridge.layout import canonical_layer_names
from megatron_bridge.megatron_args import arch_from_args, shape_from_args, source_config
from megatron_bridge.param_kinds import unpack_qkv
from megatron_bridge.torch_dist_keys import DistKey, all_param_keys, model_keys, non_model_kind

log = logging.getLogger(__name__)

Region = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


class FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file of their own: torch.load reads a chunk's
    blob in place, straight into its tensor, instead of from a copy of the blob in memory."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        if n == 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer)[:n]], self.start + self.pos)
        self.pos += got
        return got


def _overlap(a: Region, b: Region) -> Optional[Region]:
    """The intersection of two boxes, or None."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1]))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


def _volume(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def check_tiling(where: str, size: tuple[int, ...], chunks: list[Region]) -> None:
    """The chunks cover the global tensor exactly: each in bounds, none overlapping, volumes summing to the whole."""
    for off, sz in chunks:
        if len(off) != len(size) or len(sz) != len(size) or any(o < 0 or s <= 0 or o + s > g
                                                                 for o, s, g in zip(off, sz, size)):
            raise CheckpointError(f"{where}: chunk at offsets {list(off)} of sizes {list(sz)} lies outside the "
                                  f"global shape {list(size)}; the index is damaged")
    ordered = sorted(chunks)
    for i, a in enumerate(ordered):  # sweep along dim 0: only chunks that start before `a` ends can overlap it
        for b in ordered[i + 1:]:
            if size and b[0][0] >= a[0][0] + a[1][0]:
                break
            if _overlap(a, b):
                raise CheckpointError(f"{where}: chunks at offsets {list(a[0])} and {list(b[0])} overlap; the "
                                      f"index is damaged")
    covered, total = sum(_volume(sz) for _, sz in chunks), _volume(size)
    if covered != total:
        raise CheckpointError(f"{where}: the chunks cover {covered} of the {total} elements of global shape "
                              f"{list(size)}; the checkpoint is incomplete (a rank's shards are missing)")


# The TP=1 tensor's shape of each kind, from its canonical tensors' shapes: the rows concatenate (QKV's groups
# interleave whole rows of q, k and v), the vocab is padded. Worked out by arithmetic because the first `cat` of
# meta tensors imports torch's meta kernels (sympy and the decompositions: about 3 s).
_GLOBAL_SHAPE = {
    "replicated": lambda shapes, shape: shapes[0],
    "column": lambda shapes, shape: shapes[0],
    "row": lambda shapes, shape: shapes[0],
    "qkv": lambda shapes, shape: (sum(s[0] for s in shapes),) + shapes[0][1:],
    "gated_mlp": lambda shapes, shape: (sum(s[0] for s in shapes),) + shapes[0][1:],
    "vocab": lambda shapes, shape: (shape.padded_vocab_size,) + shapes[0][1:],
}


def _expected_global_shape(dk: DistKey, cfg: CanonicalConfig, shape, num_layers: int) -> tuple[int, ...]:
    """What megatron-core's global tensor of `dk` measures (a bias the args imply and the model lacks has the shape
    it would have); a kind the table lacks is worked out on meta tensors by its shard()."""
    shapes = expected_shapes(dataclasses.replace(cfg, qkv_bias=True, o_bias=True, mlp_bias=True))
    names = canonical_layer_names(dk.param.roles, 0) if dk.per_layer else list(dk.param.roles)
    rule = _GLOBAL_SHAPE.get(dk.param.kind.name)
    if rule:
        one = tuple(rule([tuple(shapes[n]) for n in names], shape))
    else:
        one = tuple(dk.param.kind.shard([torch.empty(shapes[n], device="meta") for n in names], 1, 0, shape).shape)
    return (num_layers,) + one if dk.per_layer else one


# A global tensor is the TP=1 shard of its kind: split it into canonical tensors as views (kind.merge of a single
# shard would concatenate, copying it, for nothing).
_FROM_GLOBAL = {
    "qkv": lambda t, shape: unpack_qkv(t, shape),
    "gated_mlp": lambda t, shape: list(torch.chunk(t, 2, dim=0)),
    "vocab": lambda t, shape: [t[:shape.vocab_size]],
}


def _from_global(dk: DistKey, t: torch.Tensor, shape) -> list[torch.Tensor]:
    return _FROM_GLOBAL.get(dk.param.kind.name, lambda t, shape: [t])(t, shape)


def _qkv_parts(t: torch.Tensor, shape) -> list[list[torch.Tensor]]:
    """q, k and v of a fused QKV tensor as the row blocks they are in it (one per KV group): views, where
    unpack_qkv's q, k and v are copies."""
    per, hd = shape.num_heads // shape.num_groups, shape.head_dim
    block = (per + 2) * hd
    if t.shape[0] != shape.num_groups * block:
        return [[x] for x in unpack_qkv(t, shape)]  # its error names the rows that do not fit
    starts = [g * block for g in range(shape.num_groups)]
    return [[t[s:s + per * hd] for s in starts], [t[s + per * hd:s + per * hd + hd] for s in starts],
            [t[s + per * hd + hd:s + block] for s in starts]]


def _torch_dtype(value, where: str) -> torch.dtype:
    """A dtype of the index (read as a pickle_peek name) as torch's."""
    if isinstance(value, TorchName) and value.module == "torch":
        value = getattr(torch, value.name, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"{where}: dtype {value!r} is not a torch dtype; the index is damaged")
    return value


class TorchDistSource(TensorSource):
    """Canonical view of a torch_dist checkpoint at any saved layout, local or Transformer Engine names."""

    def __init__(self, root: str, base_config: Optional[CanonicalConfig] = None, vocab_size: Optional[int] = None,
                 policy: PolicyLike = None):
        self.root, self.policy = root, trust_policy(policy)
        self.it_dir = torch_dist_format.iteration_dir(root)
        # every file present and long enough, every pickle vetted; the index as stand-ins (no DCP import)
        self.common, md = torch_dist_format.validate_index(root, self.policy)
        args = self.args = self.common["args"]
        self.config, self.vocab_known = source_config(args, root, base_config, vocab_size)
        self.shape = shape_from_args(args, self.config.vocab_size)
        self._keys, self.skipped = self._classify(md, model_keys(arch_from_args(args)))
        self._storage = {(i.fqn, tuple(i.offset) if getattr(i, "offset", None) is not None else None): info
                         for i, info in (md.storage_data or {}).items()}
        self._chunks: dict[str, list[Region]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._size: dict[str, tuple[int, ...]] = {}
        for stored, dk in self._keys.items():
            self._check_key(md, stored, dk)
        # canonical name -> (stored key, its DistKey, layer or None, index into the param's roles)
        self._index: dict[str, tuple[str, DistKey, Optional[int], int]] = {}
        for stored, dk in self._keys.items():
            for layer in (range(self.config.num_layers) if dk.per_layer else [None]):
                names = canonical_layer_names(dk.param.roles, layer) if dk.per_layer else list(dk.param.roles)
                for j, name in enumerate(names):
                    self._index[name] = (stored, dk, layer, j)
        self._slice: dict = {}  # key: (stored key, layer), global: its tensor, tensors/parts: cut from it
        self._blob: tuple = (None, None)   # ((stored key, offsets), a chunk spanning more than one slice)
        self._files: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        wanted = set(expected_tensor_names(self.config))
        missing = sorted(wanted - set(self._index))
        if missing:
            raise CheckpointError(f"{root}: the checkpoint lacks tensors its config implies: {missing[:10]}")
        self._check_absent_are_zero(set(self._index) - wanted)

    def _classify(self, md, expected: list[DistKey]) -> tuple[dict[str, DistKey], Counter]:
        """Every stored key matched to the table: (stored model key -> its DistKey, what was recognised as
        non-model state: kind -> count); anything else is an error naming the keys."""
        by_name = {name: dk for dk in expected for name in (dk.key,) + dk.aliases}
        every = all_param_keys()
        keys: dict[str, DistKey] = {}
        stored_as: dict[str, str] = {}  # DistKey.key -> the name it was found under
        skipped: Counter = Counter()
        unimplied, unknown = [], []
        for key in md.state_dict_metadata:
            if key in by_name:
                dk = by_name[key]
                if dk.key in stored_as:
                    raise CheckpointError(f"{self.it_dir}/.metadata: {dk.key} is stored under two names "
                                          f"({stored_as[dk.key]!r} and {key!r}); which one is the model's?")
                keys[key], stored_as[dk.key] = dk, key
            elif non_model_kind(key):
                skipped[non_model_kind(key)] += 1
            elif key in every:
                unimplied.append(key)
            else:
                unknown.append(key)
        problems = []
        if unknown:
            problems.append(f"keys that are no GPT model parameter {sorted(unknown)[:10]}")
        if unimplied:
            problems.append(f"parameters the checkpoint's args do not imply {sorted(unimplied)[:10]} (e.g. a bias "
                            f"without add_bias_linear, q/k norm without qk_layernorm)")
        missing = [dk.key for dk in expected if dk.key not in stored_as]
        if missing:
            problems.append(f"missing model keys {missing[:10]}")
        if problems:
            raise CheckpointError(f"{self.it_dir}/.metadata: " + "; ".join(problems) + "; nothing is dropped "
                                  f"silently, so nothing was written")
        return keys, skipped

    def _check_key(self, md, stored: str, dk: DistKey) -> None:
        where = f"{self.it_dir}/.metadata: {stored}"
        m = md.state_dict_metadata[stored]
        if not is_stand_in(m, "torch.distributed.checkpoint.metadata", "TensorStorageMetadata"):
            raise CheckpointError(f"{where}: stored as {getattr(type(m), 'origin', (0, type(m).__name__))[1]}, "
                                  f"expected a tensor")
        try:
            size, dtype = tuple(m.size), _torch_dtype(m.properties.dtype, where)
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks]
        except (AttributeError, TypeError) as e:
            raise CheckpointError(f"{where}: a damaged index entry ({e})") from None
        want = _expected_global_shape(dk, self.config, self.shape, self.config.num_layers)
        if size != want:
            raise CheckpointError(f"{where}: global shape {list(size)}, but the args imply {list(want)}")
        check_tiling(where, size, chunks)
        lost = [list(off) for off, _ in chunks if (stored, off) not in self._storage]
        if lost:
            raise CheckpointError(f"{where}: chunks at offsets {lost[:5]} have no storage entry in the index")
        self._chunks[stored], self._size[stored] = chunks, size
        self._dtypes[stored] = dtype

    def _check_absent_are_zero(self, extra: set) -> None:
        """Biases Megatron's args forced on a model without them must still be zero, or the target loses them."""
        for name in sorted(extra):
            if torch.count_nonzero(self.get(name)):
                raise ValueError(f"{name} is nonzero in the checkpoint, but the target config has no such tensor "
                                 f"(e.g. o_bias/mlp_bias=False); it cannot be expressed, so nothing was written")

    def names(self) -> list[str]:
        return expected_tensor_names(self.config)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._dtypes[self._index[name][0]]

    def _global_slice(self, stored: str, layer: Optional[int]) -> dict:
        """The global tensor of `stored` at `layer` (read once, kept until the next one) and what was cut from it."""
        if self._slice.get("key") != (stored, layer):
            self._slice = {}  # free the previous slice before reading the next
            self._slice = {"key": (stored, layer), "global": self._read(stored, layer)}
        return self._slice

    def get(self, name: str) -> torch.Tensor:
        stored, dk, layer, j = self._index[name]
        got = self._global_slice(stored, layer)
        if "tensors" not in got:
            got["tensors"] = _from_global(dk, got["global"], self.shape)
        return got["tensors"][j]

    def get_parts(self, name: str) -> list[torch.Tensor]:
        """q, k or v as the row blocks they are in the fused QKV tensor (views: unpack_qkv's tensors are copies);
        any other tensor whole."""
        stored, dk, layer, j = self._index[name]
        if dk.param.kind.name != "qkv":
            return [self.get(name)]
        got = self._global_slice(stored, layer)
        if "parts" not in got:
            got["parts"] = _qkv_parts(got["global"], self.shape)
        return got["parts"][j]

    def release(self) -> None:
        # Our maps are dropped too: each is unmapped once the last tensor viewing it is gone, so the mapped pages
        # (file-backed, yet counted as ours) stay those of the tensors in use; the next read maps the file anew.
        self._blob, self._maps = (None, None), {}

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files, self._maps = {}, {}  # a map closes once no tensor views it

    def _read(self, stored: str, layer: Optional[int]) -> torch.Tensor:
        """The global tensor of `stored` for one layer (or the whole non-layer tensor), from the chunks covering it."""
        size = self._size[stored]
        region: Region = (((layer,) + (0,) * (len(size) - 1), (1,) + size[1:]) if layer is not None
                          else ((0,) * len(size), size))
        parts = [(c, _overlap(c, region)) for c in self._chunks[stored]]
        parts = [(c, o) for c, o in parts if o]
        if len(parts) == 1 and parts[0][0] == region:  # one chunk is the whole slice: no copy
            out = self._load_chunk(stored, parts[0][0], keep=False)
        else:
            out = torch.empty(region[1], dtype=self._dtypes[stored])
            for chunk, (lo, sz) in parts:
                blob = self._load_chunk(stored, chunk, keep=_volume(chunk[1]) > _volume(sz))
                src = blob[tuple(slice(l - c, l - c + s) for l, c, s in zip(lo, chunk[0], sz))]
                out[tuple(slice(l - r, l - r + s) for l, r, s in zip(lo, region[0], sz))] = src
                del blob, src
        return out[0] if layer is not None else out

    def _load_chunk(self, stored: str, chunk: Region, keep: bool) -> torch.Tensor:
        if self._blob[0] == (stored, chunk[0]):
            return self._blob[1]
        info = self._storage[(stored, chunk[0])]
        path = os.path.join(self.it_dir, info.relative_path)
        where = f"{path} (chunk of {stored!r} at offsets {list(chunk[0])})"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: stored through transforms {info.transform_descriptors}; not supported")
        fd = self._files.get(info.relative_path)
        if fd is None:
            fd = self._files[info.relative_path] = os.open(path, os.O_RDONLY)
        if os.fstat(fd).st_size < info.offset + info.length:
            raise CheckpointError(f"{where}: truncated (the chunk ends at byte {info.offset + info.length})")
        t = self._mapped(info.relative_path, fd, info, chunk[1], self._dtypes[stored])
        if t is None:
            t = load_torch_stream(io.BufferedReader(FileSlice(fd, info.offset, info.length), 1 << 20), where,
                                  self.policy)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != chunk[1] or t.dtype != self._dtypes[stored]:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{where}: holds {got}, the index says {chunk[1]} {self._dtypes[stored]}")
        if keep:
            self._blob = ((stored, chunk[0]), t)
        return t

    def _mapped(self, rel: str, fd: int, info, sizes: tuple, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The chunk as a view of the memory-mapped file when its archive is exactly torch.save's of a plain tensor
        (what this project's writer and megatron-core write): no copy into memory of our own, and the writer of the
        output copies from the page cache once. A private map: a caller that writes to the tensor copies a page,
        never the file. Data not aligned to its element size (DCP packs archives back to back) is copied once into
        a tensor of its own. None when the archive differs: torch.load reads it."""
        mm = self._maps.get(rel)
        if mm is None:
            if os.fstat(fd).st_size == 0:  # nothing to map: torch.load reports the damage
                return None
            mm = self._maps[rel] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        at = torch_save_blob.data_offset(memoryview(mm)[info.offset:info.offset + info.length], dtype, sizes)
        if at is None:
            return None
        start, item = info.offset + at, torch.empty((), dtype=dtype).element_size()
        numel = torch.Size(sizes).numel()
        if start % item:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=numel * item, offset=start)
            return raw.clone().view(dtype).view(sizes)
        return torch.frombuffer(mm, dtype=dtype, count=numel, offset=start).view(sizes)

    def report_skipped(self) -> None:
        """Say what the checkpoint holds besides model weights (conversion keeps weights only)."""
        state = {k: n for k, n in self.skipped.items() if k in ("optimizer state", "RNG state")}
        if state or "optimizer" in self.common:
            what = ", ".join(f"{n} {k} entries" for k, n in sorted(state.items())) or "optimizer state in common.pt"
            log.warning("%s holds optimizer state; conversion keeps model weights only and drops it (%s)",
                        self.root, what)
