"""Start-up: a command imports only what it uses (no wall-clock assertions: bench/bench_startup.py measures time).

Each command runs in a fresh interpreter, as a user runs it, and reports the modules it imported. What each must
leave out, and why it matters (CPU seconds of the import alone, measured by the bench on 2 cores):
  - `--help` of the command line and of `convert`: torch (about 2.5 s), numpy and every project module beyond the
    parser, so help is as fast as Python's own start;
  - conversions and `inspect`, any format: megatron-core (its import pulls in its whole model zoo) and
    transformers; none of them builds a model;
  - `inspect`, any format (legacy, torch_dist, Hugging Face safetensors and pytorch_model.bin): torch and numpy
    (checkpoint_tools.pickle_peek reads the pickles as shape/dtype stand-ins, safetensors are read as headers), so it
    starts about as fast as Python does;
  - conversions of any format: PyTorch DCP (`torch.distributed.checkpoint`, about 1-2 s more): the torch_dist
    reader and writer handle its index as stand-ins.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_llama
from checkpoint_tools.safetensors_io import SafetensorsDir
from checkpoint_tools.torch_bin_io import BIN_NAME
from megatron_bridge.convert import ConvertOptions, convert

# Runs the command line in-process after a fresh start and writes (exit code, imported modules) as JSON.
PROBE = """
import contextlib, io, json, os, runpy, sys
sys.argv = ["launch"] + sys.argv[2:]
code = 0
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("launch", run_name="__main__")
    except SystemExit as e:
        code = e.code
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""
MEGATRON_CORE, TRANSFORMERS, DCP = "megatron.core", "transformers", "torch.distributed.checkpoint"


def imported(tmp_path, *argv: str) -> set[str]:
    out = str(tmp_path / f"modules_{len(os.listdir(tmp_path))}.json")
    env = {**os.environ, "PROBE_OUT": out, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, "probe", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        got = json.load(f)
    assert got["code"] in (0, None), (argv, got["code"])
    return set(got["modules"])


def leaves_out(modules: set[str], *packages: str) -> list[str]:
    """The modules of `packages` (each a package or module name) that were imported."""
    return sorted(m for m in modules for p in packages if m == p or m.startswith(p + "."))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    hf = make_llama(str(root / "hf"), seed=5)
    legacy, dist = str(root / "legacy"), str(root / "torch_dist")
    convert(hf, legacy, ConvertOptions(progress=False))
    convert(hf, dist, ConvertOptions(format="torch_dist", progress=False))
    hf_bin = str(root / "hf_bin")  # the same weights as one pytorch_model.bin
    os.makedirs(hf_bin)
    shutil.copyfile(os.path.join(hf, "config.json"), os.path.join(hf_bin, "config.json"))
    weights = SafetensorsDir(hf)
    torch.save({n: weights.get(n).clone() for n in weights.names()}, os.path.join(hf_bin, BIN_NAME))
    return {"root": root, "hf": hf, "hf_bin": hf_bin, "legacy": legacy, "torch_dist": dist}


@pytest.mark.parametrize("argv", [("--help",), ("convert", "--help"), ("inspect", "--help")])
def test_help_imports_no_framework(argv, tmp_path):
    modules = imported(tmp_path, *argv)
    assert "launch.cli" in modules  # the probe did run the command line
    heavy = leaves_out(modules, "torch", "numpy", MEGATRON_CORE, TRANSFORMERS, "megatron_bridge",
                       "checkpoint_tools.families")
    assert not heavy, heavy[:20]


def test_hf_and_legacy_paths_import_no_megatron_core_transformers_or_dcp(ckpts, tmp_path):
    hf, legacy, root = ckpts["hf"], ckpts["legacy"], ckpts["root"]
    commands = [
        ("convert", hf, str(root / "plan_only"), "--dry-run"),
        ("convert", hf, str(root / "hf_to_legacy"), "--tp", "2", "--no-progress"),
        ("convert", legacy, str(root / "legacy_to_hf"), "--no-progress"),
    ]
    for argv in commands:
        modules = imported(tmp_path, *argv)
        assert "torch" in modules  # these commands do read torch files: the probe saw a real run
        assert not leaves_out(modules, MEGATRON_CORE, TRANSFORMERS, DCP, "deepspeed"), (argv, leaves_out(
            modules, MEGATRON_CORE, TRANSFORMERS, DCP, "deepspeed")[:10])
    assert os.path.isfile(os.path.join(root, "legacy_to_hf", "config.json"))
    assert not os.path.exists(root / "plan_only")


def test_inspect_of_any_format_imports_no_torch_or_numpy(ckpts, tmp_path):
    for fmt in ("legacy", "torch_dist", "hf", "hf_bin"):
        modules = imported(tmp_path, "inspect", ckpts[fmt])
        assert "megatron_bridge.inspect_checkpoint" in modules and "checkpoint_tools.pickle_peek" in modules
        if fmt.startswith("hf"):  # the probe did read the folder through its family's table
            assert "checkpoint_tools.families.llama" in modules and "checkpoint_tools.hf_checkpoint" in modules
        heavy = leaves_out(modules, "torch", "numpy", MEGATRON_CORE, TRANSFORMERS)
        assert not heavy, (fmt, heavy[:10])


def test_torch_dist_paths_import_no_megatron_core_or_transformers(ckpts, tmp_path):
    dist, root = ckpts["torch_dist"], ckpts["root"]
    for argv, ran in [(("convert", dist, str(root / "dist_to_hf"), "--no-progress"), "torch_dist_reader"),
                      (("convert", ckpts["hf"], str(root / "hf_to_dist"), "--format", "torch_dist", "--no-progress"),
                       "torch_dist_writer")]:
        modules = imported(tmp_path, *argv)
        # the reader or writer did run, with the DCP index as stand-ins (torch_dist_format.validate_index,
        # dcp_index): torch.distributed.checkpoint is never imported
        assert f"megatron_bridge.{ran}" in modules and DCP not in modules, argv
        assert not leaves_out(modules, MEGATRON_CORE, TRANSFORMERS), (argv, leaves_out(
            modules, MEGATRON_CORE, TRANSFORMERS)[:10])
    assert os.path.isfile(os.path.join(root, "dist_to_hf", "config.json"))
    assert os.path.isfile(os.path.join(root, "hf_to_dist", "release", ".metadata"))
