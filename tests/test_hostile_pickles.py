"""No checkpoint file can run code: hostile and malformed pickles against every reader of a pickle.

Each hostile payload would create a marker file if anything unpickled it without limits (the `*_are_live` tests
prove that with plain `pickle`/`torch.load(weights_only=False)`, so a refusal here is never a dud). Every reader
(legacy rank files, common.pt, the DCP `.metadata` index, byte objects inside `.distcp` files, the torchrun workers,
and the `convert`/`inspect`/`verify` commands) must refuse each one by name, leave no output, and the marker must
never appear.
"""
from __future__ import annotations

import argparse
import copyreg
import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_env, make_llama
from checkpoint_tools.pickle_trust import (DEFAULT_POLICY, TrustPolicy, load_pickle_bytes, load_torch_file,
                                           parse_global, scan_pickle, trust_policy)
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import legacy_format, torch_dist_format
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.inspect_checkpoint import inspect
from megatron_bridge.mcore_launcher import run_mcore_jobs

# --------------------------------------------------------------------------------------------------------------
# Hand-written pickles: opcodes spelled out, so each attack is exactly the shape named.


def _s(text: str) -> bytes:  # BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _g(module: str, name: str) -> bytes:  # GLOBAL (protocol 0 spelling, used by every protocol)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


P2, P4 = b"\x80\x02", b"\x80\x04"


def _system(marker: str) -> bytes:
    """os.system('touch MARKER') through GLOBAL + REDUCE."""
    return _g("os", "system") + _s(f"touch {marker}") + b"\x85R"


def _getattr_chain(marker: str) -> bytes:
    # getattr(getattr(<module torch.distributed.checkpoint.filesystem>, "os"), "system")("touch MARKER")
    fs_os = _g("builtins", "getattr") + _g("torch.distributed.checkpoint", "filesystem") + _s("os") + b"\x86R"
    system = _g("builtins", "getattr") + fs_os + _s("system") + b"\x86R"
    return P4 + system + _s(f"touch {marker}") + b"\x85R."


# kind -> (builder(marker) -> pickle bytes, text the refusal must contain, fixable by --allow-global)
HOSTILE = {
    "GLOBAL builtins.open + REDUCE": (
        lambda m: P2 + _g("builtins", "open") + _s(m) + _s("w") + b"\x86R.", "builtins.open", True),
    "STACK_GLOBAL os.system": (
        lambda m: P4 + b"\x8c\x02os\x8c\x06system\x93" + _s(f"touch {m}") + b"\x85R.", "os.system", True),
    "dotted name through an allowed module (STACK_GLOBAL)": (
        lambda m: P4 + _s("torch.distributed.checkpoint.filesystem") + _s("os.system") + b"\x93"
        + _s(f"touch {m}") + b"\x85R.", "torch.distributed.checkpoint.filesystem.os.system", False),
    "dotted name in GLOBAL (torch.os.system)": (
        lambda m: P4 + _g("torch", "os.system") + _s(f"touch {m}") + b"\x85R.", "torch.os.system", False),
    # Not fixable by --allow-global: calling what a call returned is refused whatever the allow-list says.
    "builtins.getattr chain from a submodule": (_getattr_chain, "builtins.getattr", False),
    "REDUCE of an allowed class with a hostile argument": (
        lambda m: P2 + _g("collections", "OrderedDict") + b"(" + _s("k") + _system(m) + b"\x86l\x85R.",
        "os.system", True),
    "NEWOBJ of an allowed class + BUILD with a hostile state": (
        lambda m: P2 + _g("argparse", "Namespace") + b")\x81}" + _s("x") + _system(m) + b"sb.", "os.system", True),
    "BUILD on an allowed class itself (class attribute overwrite)": (
        lambda m: P2 + _g("argparse", "Namespace") + b"N}" + _s("__eq__") + _g("os", "system") + b"s\x86b"
        + _system(m) + b"0.", "BUILD (set state) on the global argparse.Namespace itself", False),
    "EXT1 extension code": (lambda m: P2 + b"\x82\xf0" + _s(f"touch {m}") + b"\x85R.", "EXT1", False),
    "INST (protocol 0)": (lambda m: b"(V" + f"touch {m}".encode() + b"\nios\nsystem\n.", "os.system", True),
    "OBJ": (lambda m: b"(" + _g("os", "system") + _s(f"touch {m}") + b"o.", "os.system", True),
}
# Not live by themselves (the unpickler fails before any call), but each is a shape no honest checkpoint has.
MALFORMED_PICKLES = {
    "REDUCE on a string": (lambda m: P2 + _s("os.system") + _s(f"touch {m}") + b"\x85R.", "REDUCE on the string"),
    "persistent id that is not a torch storage": (lambda m: P2 + _s(f"touch {m}") + b"Q.", "persistent id"),
    "memo read before write": (lambda m: P2 + b"h\x07.", "truncated or corrupt pickle"),
    "garbage bytes": (lambda m: b"\x00\xffnot a pickle at all", "truncated or corrupt pickle"),
}


@pytest.fixture
def marker(tmp_path):
    path = str(tmp_path / "PWNED")
    yield path
    assert not os.path.exists(path), "a hostile payload ran"


def _zip_with(data_pkl: bytes, path: str) -> None:
    """A real torch zip file (torch.save's records) whose data.pkl is replaced."""
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))


def _zip_bytes(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    _zip_with(data_pkl, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# The payloads are live: without the policy they run.

@pytest.mark.parametrize("kind", [k for k in HOSTILE if "BUILD on an allowed class itself" not in k])
def test_hostile_payloads_are_live_without_the_policy(kind, tmp_path):
    path = str(tmp_path / "LIVE")
    build, _, _ = HOSTILE[kind]
    if kind.startswith("EXT1"):
        copyreg.add_extension("os", "system", 0xF0)
    try:
        pickle.loads(build(path))
    finally:
        if kind.startswith("EXT1"):
            copyreg.remove_extension("os", "system", 0xF0)
    assert os.path.exists(path)


def test_torch_containers_are_live_without_the_policy(tmp_path):
    """A zip whose data.pkl is hostile, and a pre-1.6 raw pickle, both run under torch.load(weights_only=False)."""
    for name, write in (("zip", lambda p, b: _zip_with(b, p)), ("raw", lambda p, b: open(p, "wb").write(b))):
        live = str(tmp_path / f"LIVE_{name}")
        write(str(tmp_path / f"{name}.pt"), HOSTILE["STACK_GLOBAL os.system"][0](live))
        try:
            torch.load(str(tmp_path / f"{name}.pt"), weights_only=False)
        except Exception:  # noqa: BLE001 - the payload runs before torch notices the rest is not a checkpoint
            pass
        assert os.path.exists(live), name


# --------------------------------------------------------------------------------------------------------------
# Checkpoints to plant hostile files in: built once per module with the project's own converter.

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    hf = make_llama(str(root / "hf"), seed=3)
    legacy = str(root / "legacy")
    convert(hf, legacy, ConvertOptions(tp=1, pp=1, progress=False))
    td = str(root / "td")
    convert(legacy, td, ConvertOptions(format="torch_dist", progress=False))
    return {"hf": hf, "legacy": legacy, "td": td}


def _copy(src: str, tmp_path, name: str) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _rank_file(root: str) -> str:
    return os.path.join(root, "release", "mp_rank_00", legacy_format.FILE_NAME)


def _plant_byte_object(td: str, payload_zip: bytes) -> str:
    """Append a torch.save payload to a .distcp file and point one byte object of an honest index at it."""
    it = torch_dist_format.iteration_dir(td)
    md = torch_dist_format.read_dcp_metadata(td)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = next(i for i in md.storage_data if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = md.storage_data[index]
    path = os.path.join(it, info.relative_path)
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(payload_zip)
    md.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset, length=len(payload_zip),
                                        transform_descriptors=None)
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return path


def _plant(reader: str, ckpts, tmp_path, data_pkl: bytes, raw: bool = False) -> tuple[str, str]:
    """(checkpoint folder, the planted file) with `data_pkl` where `reader` will find it."""
    if reader == "legacy rank file":
        root = _copy(ckpts["legacy"], tmp_path, "ckpt")
        path = _rank_file(root)
        open(path, "wb").write(data_pkl) if raw else _zip_with(data_pkl, path)
    elif reader == "common.pt":
        root = _copy(ckpts["td"], tmp_path, "ckpt")
        path = os.path.join(torch_dist_format.iteration_dir(root), "common.pt")
        open(path, "wb").write(data_pkl) if raw else _zip_with(data_pkl, path)
    elif reader == ".metadata":
        root = _copy(ckpts["td"], tmp_path, "ckpt")
        path = os.path.join(torch_dist_format.iteration_dir(root), ".metadata")
        open(path, "wb").write(data_pkl)
    else:  # a byte object inside a .distcp file
        root = _copy(ckpts["td"], tmp_path, "ckpt")
        path = _plant_byte_object(root, data_pkl if raw else _zip_bytes(data_pkl))
    return root, path


READERS = ["legacy rank file", "common.pt", ".metadata", ".distcp byte object"]


def _refused(root: str, tmp_path, expect: str, path: str) -> None:
    """Both library entry points refuse, name the file and the offence, and write nothing."""
    with pytest.raises(CheckpointError) as info:
        inspect(root)
    msg = str(info.value)
    assert expect in msg and os.path.basename(path) in msg, msg
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="refused|corrupt|truncated"):
        convert(root, dst, ConvertOptions(progress=False))
    assert not os.path.exists(dst)


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("reader", READERS)
def test_hostile_pickle_refused_by_every_reader(reader, kind, ckpts, tmp_path, marker):
    build, expect, fixable = HOSTILE[kind]
    root, path = _plant(reader, ckpts, tmp_path, build(marker))
    _refused(root, tmp_path, expect, path)
    if fixable:  # the message says how to trust a global, and names it exactly
        with pytest.raises(CheckpointError, match="pass --allow-global MODULE.NAME if you trust it"):
            inspect(root)


@pytest.mark.parametrize("kind", list(MALFORMED_PICKLES))
@pytest.mark.parametrize("reader", READERS)
def test_malformed_pickle_refused_by_every_reader(reader, kind, ckpts, tmp_path, marker):
    build, expect = MALFORMED_PICKLES[kind]
    if reader != ".metadata" and kind.startswith("persistent id"):
        expect = "persistent id other than torch's"
    root, path = _plant(reader, ckpts, tmp_path, build(marker))
    _refused(root, tmp_path, expect, path)


@pytest.mark.parametrize("reader", ["legacy rank file", "common.pt", ".distcp byte object"])
def test_torch_file_readers_refuse_raw_pickles_and_broken_zips(reader, ckpts, tmp_path, marker):
    """A pre-1.6 raw pickle (torch.load would unpickle it as the legacy format), a truncated zip, an empty file."""
    hostile = HOSTILE["STACK_GLOBAL os.system"][0](marker)
    for i, (data, raw) in enumerate([(hostile, True), (_zip_bytes(hostile)[:200], True), (b"", True)]):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        root, path = _plant(reader, ckpts, sub, data, raw=raw)
        _refused(root, sub, "not a torch checkpoint", path)


def test_truncated_metadata_index(ckpts, tmp_path):
    root = _copy(ckpts["td"], tmp_path, "ckpt")
    path = os.path.join(torch_dist_format.iteration_dir(root), ".metadata")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _refused(root, tmp_path, "truncated or corrupt pickle", path)


def test_nested_pickle_in_bytesio_stays_bytes(ckpts, tmp_path, marker):
    """A BytesIO holding a hostile pickle is data: loading the file never unpickles what it holds."""
    root = _copy(ckpts["td"], tmp_path, "ckpt")
    path = os.path.join(torch_dist_format.iteration_dir(root), "common.pt")
    common = torch.load(path, weights_only=False)
    common["blob"] = io.BytesIO(HOSTILE["STACK_GLOBAL os.system"][0](marker))
    torch.save(common, path)
    loaded = torch_dist_format.validate(root)
    assert loaded["blob"].getvalue().startswith(P4)
    assert inspect(root)["format"] == "megatron_torch_dist"


# --------------------------------------------------------------------------------------------------------------
# The command line: exit code 2, one line naming the file and the global, no output, no marker.

def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = cli_env(OMP_NUM_THREADS="1")  # as a user runs it: no warning filters
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command,reader,kind", [
    ("convert", "legacy rank file", "STACK_GLOBAL os.system"),
    ("inspect", "legacy rank file", "builtins.getattr chain from a submodule"),
    ("inspect", ".metadata", "dotted name through an allowed module (STACK_GLOBAL)"),  # the hole
    ("verify", "common.pt", "INST (protocol 0)"),
    ("trans_megatron_to_llama", ".distcp byte object", "GLOBAL builtins.open + REDUCE"),
])
def test_cli_refuses_in_one_line(command, reader, kind, ckpts, tmp_path, marker):
    build, expect, _ = HOSTILE[kind]
    root, path = _plant(reader, ckpts, tmp_path, build(marker))
    dst = str(tmp_path / "out")
    argv = {"convert": ("convert", root, dst, "--no-progress"), "inspect": ("inspect", root),
            "verify": ("verify", ckpts["hf"], root, "--no-logits"),
            "trans_megatron_to_llama": ("trans_megatron_to_llama", root, dst, "--no-progress")}[command]
    proc = _cli(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expect in errors[0] and os.path.basename(path) in errors[0], errors[0]
    assert not os.path.exists(dst)


def test_cli_allow_global_syntax_is_checked(tmp_path):
    proc = _cli("inspect", str(tmp_path), "--allow-global", "os")
    assert proc.returncode == 2 and "expected MODULE.NAME" in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Trusting a global: --allow-global reaches every reader, torchrun workers included.

def _with_fraction_in_args(path: str) -> None:
    from fractions import Fraction

    payload = torch.load(path, weights_only=False)
    payload["args"].warmup_fraction = Fraction(1, 3)  # a harmless class outside the allow-list
    torch.save(payload, path)


def test_allow_global_trusts_exactly_that_global(ckpts, tmp_path):
    root = _copy(ckpts["legacy"], tmp_path, "ckpt")
    _with_fraction_in_args(_rank_file(root))
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction; pass --allow-global"):
        inspect(root)
    assert inspect(root, allow_globals=["fractions.Fraction"])["tp"] == 1
    proc = _cli("inspect", root, "--allow-global", "fractions.Fraction", "--json")
    assert proc.returncode == 0 and '"format": "megatron_legacy"' in proc.stdout, proc.stderr
    back = str(tmp_path / "back")
    convert(root, back, ConvertOptions(progress=False, allow_globals=("fractions.Fraction",)))
    assert os.path.exists(os.path.join(back, "config.json"))


def test_workers_get_the_policy_and_vet_what_megatron_core_reads(ckpts, tmp_path, marker):
    """One torchrun: a worker job straight at a checkpoint whose byte object is hostile (no parent check first)
    is refused inside the worker; then a checkpoint needing a user-trusted global loads in the workers only
    because the policy travelled with the job."""
    hostile, _ = _plant(".distcp byte object", ckpts, tmp_path, HOSTILE["STACK_GLOBAL os.system"][0](marker))
    with pytest.raises(RuntimeError) as info:
        run_mcore_jobs([{"checkpoint": hostile, "task": "to_legacy", "out_root": str(tmp_path / "w1")}], nproc=1)
    assert "os.system" in str(info.value) and "pass --allow-global" in str(info.value)
    assert not os.path.exists(tmp_path / "w1" / "release")

    trusted = _copy(ckpts["td"], tmp_path, "trusted")
    _with_fraction_in_args(os.path.join(torch_dist_format.iteration_dir(trusted), "common.pt"))
    out = str(tmp_path / "legacy_from_trusted")
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction"):
        convert(trusted, out, ConvertOptions(format="legacy", progress=False))
    convert(trusted, out, ConvertOptions(format="legacy", progress=False, allow_globals=("fractions.Fraction",)))
    got = legacy_format.open_legacy(out, extra_globals=["fractions.Fraction"])
    want = legacy_format.open_legacy(ckpts["legacy"])
    a, b = got.models(0, 0)[0], want.models(0, 0)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------
# What honest writers put in args loads under the default policy.

def test_megatron_lm_args_values_load_by_default(tmp_path):
    """megatron-core 0.16 enums Megatron-LM keeps in args, torch dtypes, a signal and numpy RNG state."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend, CudaGraphScope

    args = argparse.Namespace(attention_backend=AttnBackend.auto, cuda_graph_scope=[CudaGraphScope.attn],
                              model_type=ModelType.encoder_or_decoder, exit_signal=signal.SIGTERM,
                              params_dtype=torch.bfloat16, main_grads_dtype=torch.float32)
    rng = {"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}
    path = str(tmp_path / "model_optim_rng.pt")
    torch.save({"args": args, "rng_state": [rng], "model": {"w": torch.ones(2, dtype=torch.bfloat16)}}, path)
    got = load_torch_file(path)
    assert got["args"] == args and got["model"]["w"].dtype == torch.bfloat16
    assert (got["rng_state"][0]["np_rng_state"][1] == rng["np_rng_state"][1]).all()


def test_policy_value_semantics():
    assert parse_global("megatron.core.enums.ModelType") == ("megatron.core.enums", "ModelType")
    for bad in ("os", "os.", ".system", "os system", "os.sys-tem", "1os.system"):
        with pytest.raises(ValueError, match="MODULE.NAME"):
            parse_global(bad)
    extra = DEFAULT_POLICY.with_extra(["fractions.Fraction"])
    assert extra.allows("fractions", "Fraction") and not DEFAULT_POLICY.allows("fractions", "Fraction")
    assert TrustPolicy.from_json(extra.to_json()) == extra and trust_policy(None) == DEFAULT_POLICY
    # A dotted name is never a pair, even when its pieces look allowed.
    assert not DEFAULT_POLICY.with_extra(["torch.os"]).allows("torch", "os.system")
    # The scan imports nothing: a module that does not exist is refused by name, not by an ImportError.
    with pytest.raises(CheckpointError, match="no_such_module.thing"):
        scan_pickle(P2 + _g("no_such_module", "thing") + b")R.", "x.pkl")
    assert "no_such_module" not in sys.modules
    with pytest.raises(CheckpointError, match="persistent id"):
        load_pickle_bytes(P2 + _s("x") + b"Q.", "x.pkl")
