"""The conversion plan: which steps run for each (source format, target, flags), and flags that mean one thing.

Pure tests of `plan_conversion` (no file is read), plus end-to-end checks that a Megatron layout flag alone means
Megatron output, that VPP and the vocab divisor default to the source's, that a flag a direction cannot use is refused
before anything is written, and that `--dry-run` prints the plan and writes nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_bridge import legacy_format
from megatron_bridge.conversion_plan import HF, LEGACY, TORCH_DIST, ConvertOptions, plan_conversion
from megatron_bridge.convert import convert, hf_to_megatron

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def actions(fmt, target=None, megatron=False, **opts):
    plan = plan_conversion(fmt, ConvertOptions(**opts), target_family=target, megatron_target=megatron)
    return [(s.action, s.src, s.dst) for s in plan.steps]


@pytest.mark.parametrize("fmt,target,megatron,opts,expected", [
    (HF, None, False, {}, [("hf_to_legacy", "source", "destination")]),
    (HF, None, True, {"tp": 2}, [("hf_to_legacy", "source", "destination")]),
    (HF, "qwen2", False, {}, [("hf_to_family", "source", "destination")]),
    (HF, None, False, {"format": "torch_dist", "tp": 2}, [("hf_to_torch_dist", "source", "destination")]),
    (LEGACY, None, False, {}, [("legacy_to_hf", "source", "destination")]),
    (LEGACY, "qwen2", False, {}, [("legacy_to_hf", "source", "destination")]),
    (LEGACY, None, True, {}, [("legacy_to_legacy", "source", "destination")]),
    (LEGACY, None, False, {"vpp": 2}, [("legacy_to_legacy", "source", "destination")]),
    (LEGACY, None, False, {"name_style": "te"}, [("legacy_to_legacy", "source", "destination")]),
    (LEGACY, None, False, {"make_vocab_size_divisible_by": 64}, [("legacy_to_legacy", "source", "destination")]),
    (LEGACY, None, False, {"format": "torch_dist"}, [("legacy_to_torch_dist", "source", "destination")]),
    (LEGACY, None, False, {"format": "torch_dist", "pp": 2}, [("legacy_to_torch_dist", "source", "destination")]),
    (TORCH_DIST, None, False, {}, [("torch_dist_to_hf", "source", "destination")]),
    (TORCH_DIST, "qwen2", False, {}, [("torch_dist_to_hf", "source", "destination")]),
    (TORCH_DIST, None, False, {"tp": 1, "format": "legacy"}, [("torch_dist_to_legacy", "source", "destination")]),
    (TORCH_DIST, None, False, {"tp": 2}, [("torch_dist_to_torch_dist", "source", "destination")]),
    (TORCH_DIST, None, False, {"format": "legacy", "name_style": "te"},
     [("torch_dist_to_legacy", "source", "destination")]),
    (TORCH_DIST, None, False, {"format": "torch_dist", "dtype": "bfloat16"},
     [("torch_dist_to_torch_dist", "source", "destination")]),
])
def test_plan_steps(fmt, target, megatron, opts, expected):
    assert actions(fmt, target, megatron, **opts) == expected


def test_torch_dist_steps_take_every_option_in_one_pass():
    """torch_dist is streamed in both directions: layout, names and dtype change in one step with the user's own
    options (force included), never through a staged legacy copy."""
    for fmt, opts in [(TORCH_DIST, ConvertOptions(tp=2, pp=2, format="legacy", name_style="te", force=True)),
                      (HF, ConvertOptions(tp=2, format="torch_dist", dtype="bfloat16", force=True)),
                      (TORCH_DIST, ConvertOptions(vpp=2, pp=2, dtype="float16", force=True))]:
        (step,) = plan_conversion(fmt, opts).steps
        assert (step.src, step.dst) == ("source", "destination") and step.options(opts) == opts


@pytest.mark.parametrize("fmt,target,megatron,opts,flag", [
    (HF, "qwen2", False, {"tp": 2}, "--tp"),
    (HF, "qwen2", False, {"vpp": 2}, "--vpp"),
    (HF, "qwen2", False, {"name_style": "te"}, "--names"),
    (HF, "qwen2", False, {"make_vocab_size_divisible_by": 64}, "--make-vocab-size-divisible-by"),
    (HF, "qwen2", False, {"format": "legacy"}, "--format"),
    (HF, None, False, {"vocab_size": 100}, "--vocab-size"),
    (HF, None, False, {"max_shard_bytes": 1000}, "--max-shard-size"),
    (LEGACY, "qwen2", False, {"tp": 2}, "--tp"),
    (LEGACY, None, False, {"tp": 2, "max_shard_bytes": 1000}, "--max-shard-size"),
    (LEGACY, None, True, {"tokenizer": "tok"}, "--tokenizer"),
    (TORCH_DIST, None, False, {"name_style": "te", "format": "torch_dist"}, "--names"),
    (HF, None, False, {"name_style": "te", "format": "torch_dist"}, "--names"),
])
def test_flags_that_do_not_apply_are_refused(fmt, target, megatron, opts, flag):
    with pytest.raises(ValueError) as e:
        plan_conversion(fmt, ConvertOptions(**opts), target_family=target, megatron_target=megatron)
    assert flag in str(e.value)


def test_layout_flag_alone_means_megatron_output_with_source_defaults(tiny_llama, tmp_path):
    """--names te on a PP=2 VPP=2 source: a Megatron checkpoint at the source's TP/PP/VPP and vocab divisor."""
    src = str(tmp_path / "src")
    hf_to_megatron(tiny_llama, src, ConvertOptions(tp=1, pp=2, vpp=2, make_vocab_size_divisible_by=64,
                                                   progress=False))
    out = str(tmp_path / "te")
    what, _ = convert(src, out, ConvertOptions(name_style="te", progress=False))
    assert what == "megatron legacy -> megatron legacy"
    ckpt = legacy_format.open_legacy(out)
    assert (ckpt.tp, ckpt.pp, ckpt.vpp) == (1, 2, 2)
    assert ckpt.args.make_vocab_size_divisible_by == 64
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in ckpt.models(0, 0)[0])


def test_vocab_divisor_is_honoured_when_resharding(tiny_llama, tmp_path):
    src = str(tmp_path / "src")
    hf_to_megatron(tiny_llama, src, ConvertOptions(tp=2, progress=False))
    out = str(tmp_path / "div")
    convert(src, out, ConvertOptions(make_vocab_size_divisible_by=100, progress=False))
    args = legacy_format.open_legacy(out).args
    assert args.make_vocab_size_divisible_by == 100
    assert legacy_format.open_legacy(src).args.padded_vocab_size == 256  # vocab 250 -> a multiple of 128 * TP=2
    assert args.padded_vocab_size == 400  # -> a multiple of 100 * TP=2


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llama, tmp_path):
    dst = tmp_path / "out"
    r = _cli("convert", tiny_llama, str(dst), "--tp", "2", "--format", "torch_dist", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "hf_to_torch_dist: source -> destination" in r.stdout
    assert not dst.exists()
    assert os.listdir(tmp_path) == [] or all(not n.startswith(".out") for n in os.listdir(tmp_path))


def test_cli_refuses_a_flag_that_does_not_apply(tiny_llama, tmp_path):
    r = _cli("convert", tiny_llama, str(tmp_path / "out"), "--to", "qwen2", "--vpp", "2")
    assert r.returncode == 2
    assert "--vpp" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
