"""One trust policy for every pickle a checkpoint holds: exact (module, name) pairs, every call checked, no code runs.

Pickle is a small stack machine whose GLOBAL/STACK_GLOBAL opcodes import any attribute of any module and whose
REDUCE/NEWOBJ/INST/OBJ/BUILD opcodes call what was imported: a crafted checkpoint can run anything unless every
global it names is vetted. Megatron rank files, `common.pt`, the DCP `.metadata` index, the byte objects inside
`.distcp` files, optimizer state and Hugging Face `pytorch_model.bin` shards all pass through this module:

1. `scan_pickle` walks the raw opcodes with `pickletools` (nothing is imported or called) on a symbolic stack:
   every global must be an exact pair of the policy with a plain name (no dots: pickle would otherwise walk
   attributes from an allowed module to anywhere); REDUCE/NEWOBJ/INST/OBJ may only call such a global; BUILD and
   item-setting opcodes only touch objects built from one; extension codes and out-of-band buffers are refused;
   persistent ids (torch's tensor storages) must have torch's `("storage", <allowed storage type>, ...)` form.
   Every offence is collected, so one refusal names them all, then `CheckpointError` says how to trust a global.
2. Only then the file is loaded: torch files with `torch.load(weights_only=True)` and exactly the scanned globals
   as safe globals; plain pickles with an Unpickler whose `find_class` consults the same policy.

`TrustPolicy` is a frozen value: `DEFAULT_POLICY` holds `DEFAULT_ALLOWED_GLOBALS`; `with_extra` adds what a user
trusts (`--allow-global MODULE.NAME`); `to_json`/`from_json` carry it to torchrun workers unchanged.
"""
from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from checkpoint_tools.errors import CheckpointError

# Dtypes torch pickles as globals (`torch.float32` -> GLOBAL "torch float32"): args hold them (params_dtype, ...).
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16",
                 "int8", "uint64", "uint32", "uint16", "uint8", "bool", "float8_e4m3fn", "float8_e5m2",
                 "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
# The typed storages torch names in a tensor's persistent id (its legacy storage classes).
_TORCH_STORAGES = ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                   "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage",
                   "ComplexDoubleStorage")

# Every global a checkpoint may name, as exact (module, name) pairs: one entry a line; append what a new writer
# needs (each entry is a plain data class, enum, dtype or tensor-rebuild function: nothing that runs user code).
DEFAULT_ALLOWED_GLOBALS: tuple[tuple[str, str], ...] = (
    # torch tensors and their storages (what torch.save writes for a state dict)
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    *(("torch", storage) for storage in _TORCH_STORAGES),
    ("torch", "Size"),
    ("torch", "device"),
    *(("torch", dtype) for dtype in _TORCH_DTYPES),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "channels_last"),
    ("torch", "preserve_format"),
    ("torch.serialization", "_get_layout"),
    # containers and values the standard library pickles by reference
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("_codecs", "encode"),  # protocol 2 spells bytes as _codecs.encode(text, "latin1")
    ("argparse", "Namespace"),
    ("types", "SimpleNamespace"),
    ("pathlib", "PosixPath"),
    ("io", "BytesIO"),
    ("_io", "BytesIO"),
    ("signal", "Signals"),  # Megatron-LM args.exit_signal
    # numpy: RNG state in rank files
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.dtypes", "UInt32DType"),
    ("numpy.dtypes", "Int64DType"),
    ("numpy.dtypes", "Float64DType"),
    ("numpy.dtypes", "Float32DType"),
    ("numpy.dtypes", "Int32DType"),
    ("numpy.dtypes", "BoolDType"),
    # megatron-core 0.16 values in Megatron-LM's args and checkpoint (its own megatron/core/safe_globals.py)
    ("megatron.core.enums", "ModelType"),  # args.model_type
    ("megatron.core.transformer.enums", "ModelType"),
    ("megatron.core.transformer.enums", "AttnBackend"),  # args.attention_backend
    ("megatron.core.transformer.enums", "CudaGraphScope"),  # args.cuda_graph_scope
    # megatron-core 0.19 lists these enums beside the ones above in its own safe_globals.py (absent from 0.16)
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.transformer.enums", "AttnMaskType"),
    ("megatron.core.transformer.enums", "AttnType"),
    ("megatron.core.transformer.enums", "LayerType"),
    ("megatron.core.enums", "Fp8Recipe"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
    # the PyTorch DCP index (.metadata of a torch_dist checkpoint)
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),  # megatron-core keeps its save plans in the index
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
)

TRUST_HINT = "pass --allow-global MODULE.NAME if you trust it"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_global(text: str) -> tuple[str, str]:
    """'package.module.Name' -> ('package.module', 'Name'): the module is everything before the last dot."""
    parts = text.strip().split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise ValueError(f"--allow-global {text!r}: expected MODULE.NAME with Python identifiers, "
                         f"e.g. --allow-global megatron.core.enums.ModelType")
    return ".".join(parts[:-1]), parts[-1]


@dataclass(frozen=True)
class TrustPolicy:
    """The exact (module, name) pairs a pickle may name; nothing else is imported, called or built."""

    allowed: frozenset

    def allows(self, module: str, name: str) -> bool:
        # A dotted name makes pickle walk attributes (`allowed_module` + `os.system`): never a plain pair.
        return "." not in name and (module, name) in self.allowed

    def with_extra(self, names: Iterable[str]) -> "TrustPolicy":
        """This policy plus globals a user trusts, each 'MODULE.NAME' (see `parse_global`)."""
        extra = {parse_global(n) for n in names}
        return self if extra <= self.allowed else TrustPolicy(self.allowed | frozenset(extra))

    def resolve(self, module: str, name: str) -> Any:
        """Import an allowed global (only after the scan said the file needs it)."""
        if not self.allows(module, name):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return getattr(importlib.import_module(module), name)

    def to_json(self) -> list[list[str]]:
        """The allow-list as JSON data, for a worker process to rebuild the same policy."""
        return [list(pair) for pair in sorted(self.allowed)]

    @classmethod
    def from_json(cls, data: Optional[list]) -> "TrustPolicy":
        if data is None:
            return DEFAULT_POLICY
        return cls(frozenset((str(m), str(n)) for m, n in data))


DEFAULT_POLICY = TrustPolicy(frozenset(DEFAULT_ALLOWED_GLOBALS))

PolicyLike = Union[TrustPolicy, Iterable[str], None]


def trust_policy(policy: PolicyLike = None) -> TrustPolicy:
    """A TrustPolicy from a policy, or the default plus a list of 'MODULE.NAME' a user trusts (None: default)."""
    if isinstance(policy, TrustPolicy):
        return policy
    return DEFAULT_POLICY.with_extra(policy or ())


# ---------------------------------------------------------------------------------------------------------------
# The scanner: a symbolic pickle machine. Stack values say only what matters for trust.

class _Mark:
    pass


_MARK = _Mark()


@dataclass(frozen=True)
class _Str:
    value: str


@dataclass(frozen=True)
class _Global:
    module: str
    name: str
    allowed: bool


@dataclass(frozen=True)
class _Built:
    """An object made by calling an allowed global (REDUCE, NEWOBJ, INST, OBJ)."""
    of: _Global


@dataclass(frozen=True)
class _Tuple:
    items: tuple


class _Data:
    """Any other value (numbers, bytes, lists, dicts, ...): plain data a pickle builds without calling anything."""


_DATA = _Data()
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_CONST_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "NONE",
              "NEWTRUE", "NEWFALSE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "EMPTY_LIST",
              "EMPTY_DICT", "EMPTY_SET"}
_NEVER = {"EXT1": "an extension code (copyreg registry lookup)", "EXT2": "an extension code (copyreg registry lookup)",
          "EXT4": "an extension code (copyreg registry lookup)", "NEXT_BUFFER": "an out-of-band buffer",
          "READONLY_BUFFER": "an out-of-band buffer"}


class _Scan:
    def __init__(self, policy: TrustPolicy, torch_storages: bool):
        self.policy, self.torch_storages = policy, torch_storages
        self.stack: list = []
        self.memo: dict = {}
        self.refused: list[str] = []  # fixable by --allow-global
        self.forbidden: list[str] = []  # never fixable: shapes no honest checkpoint has
        self.globals: set[tuple[str, str]] = set()

    def pop(self, n: int = 1) -> list:
        if n > len(self.stack) or any(v is _MARK for v in self.stack[len(self.stack) - n:]):
            raise ValueError("stack underflow")
        out = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return out

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                out = self.stack[i + 1:]
                del self.stack[i:]
                return out
        raise ValueError("no MARK on the stack")

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise ValueError("stack underflow")
        return self.stack[-1]

    def global_(self, module: str, name: str) -> _Global:
        ok = self.policy.allows(module, name)
        if not ok:
            if "." in name or not all(_IDENTIFIER.fullmatch(p) for p in [*module.split("."), name]):
                self.forbidden.append(f"{module}.{name} (a dotted or malformed name walks attributes; "
                                      f"only exact MODULE.NAME pairs are allowed)")
            elif f"{module}.{name}" not in self.refused:
                self.refused.append(f"{module}.{name}")
        else:
            self.globals.add((module, name))
        return _Global(module, name, ok)

    def call(self, what: str, target) -> _Data | _Built:
        if isinstance(target, _Global):
            return _Built(target)  # an unallowed global was already reported where it was named
        self.forbidden.append(f"{what} on {self.describe(target)} (only an allowed global may be called)")
        return _DATA

    def modify(self, what: str, target) -> None:
        if isinstance(target, _Global):
            self.forbidden.append(f"{what} on the global {target.module}.{target.name} itself "
                                  f"(would change a class or function)")

    @staticmethod
    def describe(v) -> str:
        if isinstance(v, _Global):
            return f"the global {v.module}.{v.name} itself"
        if isinstance(v, _Built):
            return f"an object built by {v.of.module}.{v.of.name}"
        if isinstance(v, _Str):
            return f"the string {v.value[:40]!r}"
        return "plain data"

    def persistent_id(self, pid) -> None:
        if not self.torch_storages:
            self.forbidden.append("a persistent id (this file is a plain pickle; it has no external storages)")
            return
        items = pid.items if isinstance(pid, _Tuple) else ()
        if not (len(items) >= 2 and items[0] == _Str("storage") and isinstance(items[1], _Global)):
            self.forbidden.append("a persistent id other than torch's ('storage', <storage type>, key, ...) form")

    def run(self, data: bytes) -> None:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _NEVER:
                self.forbidden.append(f"{name}: {_NEVER[name]}")
                self.stack.append(_DATA)
            elif name in _STRING_OPS:
                self.stack.append(_Str(arg if isinstance(arg, str) else str(arg)))
            elif name in _CONST_OPS:
                self.stack.append(_DATA)
            elif name == "EMPTY_TUPLE":
                self.stack.append(_Tuple(()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                self.stack.append(_Tuple(tuple(self.pop(int(name[-1])))))
            elif name == "TUPLE":
                self.stack.append(_Tuple(tuple(self.pop_mark())))
            elif name in ("LIST", "DICT", "FROZENSET"):
                self.pop_mark()
                self.stack.append(_DATA)
            elif name == "MARK":
                self.stack.append(_MARK)
            elif name == "POP":
                self.pop()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name == "DUP":
                self.stack.append(self.top())
            elif name in ("APPEND", "SETITEM"):
                self.pop(1 if name == "APPEND" else 2)
                self.modify(name, self.top())
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                self.pop_mark()
                self.modify(name, self.top())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                self.memo[arg] = self.top()
            elif name == "MEMOIZE":
                self.memo[len(self.memo)] = self.top()
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in self.memo:
                    raise ValueError(f"memo key {arg} read before it was written")
                self.stack.append(self.memo[arg])
            elif name == "GLOBAL":
                module, sep, attr = arg.partition(" ")
                if not sep or " " in attr:
                    raise ValueError(f"malformed GLOBAL {arg!r}")
                self.stack.append(self.global_(module, attr))
            elif name == "STACK_GLOBAL":
                module, attr = self.pop(2)
                if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                    self.forbidden.append("STACK_GLOBAL with a computed module or name (not string constants)")
                    self.stack.append(_Global("?", "?", False))
                else:
                    self.stack.append(self.global_(module.value, attr.value))
            elif name == "INST":
                self.pop_mark()
                module, sep, attr = arg.partition(" ")
                self.stack.append(_Built(self.global_(module, attr)))
            elif name == "OBJ":
                items = self.pop_mark()
                if not items:
                    raise ValueError("OBJ without a class")
                self.stack.append(self.call("OBJ", items[0]))
            elif name == "REDUCE":
                func, _args = self.pop(2)
                self.stack.append(self.call("REDUCE", func))
            elif name == "NEWOBJ":
                cls, _args = self.pop(2)
                self.stack.append(self.call("NEWOBJ", cls))
            elif name == "NEWOBJ_EX":
                cls, _args, _kwargs = self.pop(3)
                self.stack.append(self.call("NEWOBJ_EX", cls))
            elif name == "BUILD":
                self.pop()
                target = self.top()
                if not isinstance(target, _Built):
                    self.forbidden.append(f"BUILD (set state) on {self.describe(target)} "
                                          f"(only on objects built by an allowed global)")
            elif name == "PERSID":
                self.persistent_id(_Str(arg))
                self.stack.append(_DATA)
            elif name == "BINPERSID":
                self.persistent_id(self.pop()[0])
                self.stack.append(_DATA)
            elif name in ("PROTO", "FRAME", "STOP"):
                pass
            else:  # an opcode pickletools knows and this scanner does not: refuse rather than guess
                self.forbidden.append(f"opcode {name}")


def scan_pickle(data: bytes, where: str, policy: PolicyLike = None, *, torch_storages: bool = False
                ) -> set[tuple[str, str]]:
    """Check a raw pickle against the policy without importing or calling anything; return the globals it needs.

    Raises CheckpointError naming `where` and every offending global or opcode.
    """
    scan = _Scan(trust_policy(policy), torch_storages)
    try:
        scan.run(data)
    except (ValueError, EOFError, UnicodeDecodeError) as e:  # pickletools' parse errors and our stack checks
        raise CheckpointError(f"{where}: truncated or corrupt pickle ({e})") from None
    if scan.forbidden:
        raise CheckpointError(f"{where}: refused to unpickle: {'; '.join(scan.forbidden[:5])}"
                              + (f" (and {len(scan.forbidden) - 5} more)" if len(scan.forbidden) > 5 else "")
                              + (f"; also globals outside the allow-list: {scan.refused}" if scan.refused else ""))
    if scan.refused:
        raise CheckpointError(f"{where}: refused to unpickle globals outside the allow-list: "
                              f"{', '.join(scan.refused)}; {TRUST_HINT}")
    return scan.globals


# ---------------------------------------------------------------------------------------------------------------
# Loading: scan first, then a restricted loader with the same policy.

def _zip_pickle(data_or_path: Union[str, bytes], where: str) -> bytes:
    """The `data.pkl` inside a torch zip file (the only pickle in it); refuses the pre-1.6 non-zip format."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    try:
        with zipfile.ZipFile(src) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise CheckpointError(f"{where}: a torch zip file with {len(names)} data.pkl entries; "
                                      f"expected exactly one")
            return z.read(names[0])
    except zipfile.BadZipFile:
        raise CheckpointError(f"{where}: truncated or not a torch checkpoint (not a zip file; torch.save has "
                              f"written zip files since torch 1.6: re-save it with a current torch)") from None
    except (OSError, EOFError, zipfile.LargeZipFile, RuntimeError) as e:
        raise CheckpointError(f"{where}: truncated or not a torch checkpoint ({e})") from None


# Objects whose concrete class differs from the global that built them: numpy.dtype("u4") is a
# numpy.dtypes.UInt32DType, and torch's weights-only BUILD checks the concrete class. Allowed pairs of these modules
# join the safe globals whenever the builder is needed.
_BUILT_CLASSES = {("numpy", "dtype"): "numpy.dtypes"}


def _torch_load(source, where: str, needed: set, policy: TrustPolicy, mmap: bool) -> Any:
    import torch

    for builder, module in _BUILT_CLASSES.items():
        if builder in needed:
            needed = needed | {pair for pair in policy.allowed if pair[0] == module}
    try:
        # (object, exact path) pairs: torch then matches the pickled path itself, not the object's own __qualname__.
        objects = [(policy.resolve(m, n), f"{m}.{n}") for m, n in sorted(needed)]
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{where}: needs a global that cannot be imported here ({e})") from None
    try:
        with torch.serialization.safe_globals(objects):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused by the weights-only unpickler ({e}); {TRUST_HINT}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: truncated or not a torch checkpoint ({e})") from None


def load_torch_file(path: str, policy: PolicyLike = None, *, mmap: bool = True) -> Any:
    """A torch.save file (rank file, common.pt, optimizer file, pytorch_model.bin), scanned then loaded
    weights-only; tensors stay memory-mapped when `mmap`."""
    policy = trust_policy(policy)
    needed = scan_pickle(_zip_pickle(path, path), path, policy, torch_storages=True)
    return _torch_load(path, path, needed, policy, mmap)


def scan_torch_bytes(data: bytes, where: str, policy: PolicyLike = None) -> set[tuple[str, str]]:
    """Vet a torch.save payload held in memory without loading it (for a reader that unpickles it later)."""
    return scan_pickle(_zip_pickle(data, where), where, policy, torch_storages=True)


def load_torch_bytes(data: bytes, where: str, policy: PolicyLike = None) -> Any:
    """A torch.save payload held in memory (e.g. a byte object inside a DCP `.distcp` file)."""
    policy = trust_policy(policy)
    needed = scan_pickle(_zip_pickle(data, where), where, policy, torch_storages=True)
    return _torch_load(io.BytesIO(data), where, needed, policy, mmap=False)


def load_torch_stream(stream, where: str, policy: PolicyLike = None) -> Any:
    """A torch.save payload read through a seekable file object (e.g. one chunk of a DCP `.distcp` file, read in
    place by its byte range): scanned, then loaded weights-only straight into its tensors, never buffered whole."""
    policy = trust_policy(policy)
    needed = scan_pickle(_zip_pickle(stream, where), where, policy, torch_storages=True)
    stream.seek(0)
    return _torch_load(stream, where, needed, policy, mmap=False)


class _PolicyUnpickler(pickle.Unpickler):
    """A plain-pickle loader that imports only the policy's exact pairs (the scan already vetted every call)."""

    def __init__(self, file, policy: TrustPolicy):
        super().__init__(file)
        self._policy = policy

    def find_class(self, module: str, name: str) -> Any:
        return self._policy.resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a plain pickle")


def load_pickle_bytes(data: bytes, where: str, policy: PolicyLike = None) -> Any:
    """A plain pickle (the DCP `.metadata` index), scanned then loaded by a policy-bound Unpickler."""
    policy = trust_policy(policy)
    scan_pickle(data, where, policy)
    try:
        return _PolicyUnpickler(io.BytesIO(data), policy).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure past the scan means the pickle is damaged
        raise CheckpointError(f"{where}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def read_file_bytes(path: str) -> bytes:
    """The whole file, or a CheckpointError naming it (a plain pickle is read whole before it is scanned)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def load_pickle_file(path: str, policy: PolicyLike = None) -> Any:
    return load_pickle_bytes(read_file_bytes(path), path, policy)
