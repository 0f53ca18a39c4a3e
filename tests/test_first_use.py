"""What a new user sees first: no import noise, progress that moves, one-line errors for damaged files.

Every test runs the real command line in a subprocess with the environment a user has (no warning filters), and
reads its stderr as a person would.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_bridge import legacy_format
from megatron_bridge.convert import ConvertOptions, hf_to_megatron

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*argv, check=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "launch", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def warning_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.search(r"warn", ln, re.IGNORECASE)]


@pytest.fixture
def mg_with_enums(tiny_llama, tmp_path):
    """A legacy checkpoint whose args hold megatron-core enums, as Megatron-LM's do: reading them imports
    megatron-core, whose import is where the Transformer Engine / Apex notices came from."""
    from megatron.core.transformer.enums import AttnBackend

    mg = str(tmp_path / "mg")
    hf_to_megatron(tiny_llama, mg, ConvertOptions(tp=1, pp=1, progress=False))
    path = os.path.join(mg, "release", "mp_rank_00", legacy_format.FILE_NAME)
    payload = torch.load(path, weights_only=False)
    payload["args"].attention_backend = AttnBackend.auto
    torch.save(payload, path)
    return mg


def test_inspect_and_convert_print_no_warnings(mg_with_enums, tmp_path):
    r = cli("inspect", mg_with_enums, check=0)
    assert warning_lines(r.stderr) == [], r.stderr
    r = cli("convert", mg_with_enums, str(tmp_path / "back"), "--no-progress", check=0)
    assert warning_lines(r.stderr) == [], r.stderr


def test_progress_moves_at_tp1_pp1_counting_tensors(tiny_llama, tmp_path):
    r = cli("convert", tiny_llama, str(tmp_path / "mg"), check=0)
    # 4 layers x 5 tensors (qkv, proj, fc1, fc2, 2 norms... local spec) + embedding, final norm, output layer:
    # the total is whatever the layout holds; what matters is a bar in tensors that reaches its total.
    bars = re.findall(r"(\d+)/(\d+) \[[^\]]*tensor/s\]", r.stderr)
    assert bars, r.stderr
    done, total = map(int, bars[-1])
    ckpt = legacy_format.open_legacy(str(tmp_path / "mg"))
    stored = sum(1 for k, v in ckpt.models(0, 0)[0].items() if v is not None)
    assert done == total == stored > 1


def test_damaged_safetensors_header_is_one_line(tiny_llama, tmp_path):
    path = os.path.join(tiny_llama, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[10:20] = b"xxxxxxxxxx"  # inside the JSON header: a key renamed, the entry no longer a tensor
    open(path, "wb").write(data)
    r = cli("convert", tiny_llama, str(tmp_path / "mg"), "--tp", "2", check=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "damaged safetensors header" in lines[0]
    assert not (tmp_path / "mg").exists()


def test_tokenizer_that_is_not_a_folder_is_refused_and_v_shows_the_traceback(tiny_llama, tmp_path):
    """Before: a --tokenizer path that is not a folder was skipped silently and the output had no tokenizer."""
    not_a_dir = tmp_path / "tok"
    not_a_dir.write_text("x")
    r = cli("convert", tiny_llama, str(tmp_path / "mg"), "--tokenizer", str(not_a_dir), check=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--tokenizer" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "mg").exists()
    r = cli("-v", "convert", tiny_llama, str(tmp_path / "mg"), "--tokenizer", str(not_a_dir))
    assert r.returncode != 0 and "Traceback" in r.stderr


def _flip_middle_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(data)


def test_flipped_bit_in_a_rank_file_is_refused_not_converted(tiny_llama, tmp_path):
    """Before: torch.load(mmap=True) never checks the zip CRCs, so one flipped bit in a weight converted silently
    into a wrong Hugging Face tensor. Now the record's checksum is checked first and nothing is written."""
    mg = str(tmp_path / "mg")
    hf_to_megatron(tiny_llama, mg, ConvertOptions(tp=1, pp=2, progress=False))
    rank = os.path.join(mg, "release", "mp_rank_00_001", legacy_format.FILE_NAME)
    _flip_middle_byte(rank)
    r = cli("convert", mg, str(tmp_path / "back"), check=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mp_rank_00_001" in lines[0] and "checksum mismatch" in lines[0], r.stderr
    assert not (tmp_path / "back").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".back")] == []
