"""Checkpoints upstream Megatron-LM core_r0.16.0 wrote itself (tests/fixtures/megatron_lm, README there) convert to
Hugging Face and compute what their source computed: the HF model they came from, or the loss upstream's own
`pretrain_gpt.py` logged on them.

These replace tests built from our own output dressed up as Megatron-LM's: upstream pickles enums and
`signal.Signals` into `args`, writes optimizer and RNG state, names fields its own way (`layernorm_epsilon`) and
records no true vocab when it trains with a Hugging Face tokenizer.
"""
import json
import os
import re
import shutil

import pytest
import torch

from checkpoint_tools.errors import CheckpointError
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.legacy_format import open_legacy
from megatron_bridge.verify import compare_hf_dirs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron_lm")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def to_hf(src: str, dst: str, family: str, **opts) -> str:
    convert(src, dst, ConvertOptions(progress=False, **opts), to=family)
    return dst


def logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.tensor([[1, 17, 42, 199, 3, 88, 150, 7, 64, 2, 120, 33]])


@pytest.mark.parametrize("name,source,family", [
    ("llama_tp2pp2", "llama_hf", "llama"),    # tools/checkpoint convert at TP=2 PP=2: GQA, untied
    ("qwen2_tp1pp2", "qwen2_hf", "qwen2"),    # at PP=2: q/k/v bias, tied (the last stage holds a copy)
])
def test_upstream_converted_checkpoint_comes_back_as_its_source(tmp_path, name, source, family):
    """No sidecar: the architecture comes from upstream's `args` alone, the tokenizer files from --tokenizer."""
    back = to_hf(fixture(name), str(tmp_path / "back"), family, tokenizer=fixture(source))
    rt = compare_hf_dirs(fixture(source), back)
    assert rt.tensors_equal == rt.tensors_total > 0 and not rt.missing and not rt.extra, rt.mismatched
    assert rt.assets_equal == rt.assets_total >= 2
    # Upstream records the epsilon as `layernorm_epsilon` (1e-6 here, not Megatron's default 1e-5) and the true
    # vocab the converter read from the tokenizer (200, padded to 256). The rest of config.json comes from our
    # family table, not from the source's file: compare what the model computes with.
    src_cfg = json.load(open(os.path.join(fixture(source), "config.json")))
    cfg = json.load(open(os.path.join(back, "config.json")))
    for key in ("rms_norm_eps", "vocab_size", "tie_word_embeddings", "num_key_value_heads", "hidden_size",
                "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        assert cfg[key] == src_cfg[key], key
    torch.testing.assert_close(logits(back, TOKENS), logits(fixture(source), TOKENS), rtol=0, atol=1e-5)


def _raw_output_rows(ckpt_dir: str, rows: slice) -> torch.Tensor:
    """Rows of the stored (padded) output matrix, read straight from the last stage's rank files."""
    ckpt = open_legacy(ckpt_dir)
    last = ckpt.pp - 1
    key = "output_layer.weight" if ckpt.args.untie_embeddings_and_output_weights or ckpt.pp > 1 else \
        "embedding.word_embeddings.weight"
    return torch.cat([ckpt.models(t, last)[-1][key] for t in range(ckpt.tp)])[rows].float()


def test_upstream_trained_checkpoint_reproduces_upstreams_logged_loss(tmp_path):
    """qwen2_trained: pretrain_gpt.py trained qwen2_tp1pp2 one step and saved iteration 2 with optimizer and RNG
    state; resumed once more, it logged the loss of those saved weights on a recorded micro-batch. The HF model we
    convert it to gives the same loss (Megatron's softmax also covers the padded rows, added here from the
    checkpoint). Upstream trained with a Hugging Face tokenizer, so its args hold no true vocab: --vocab-size."""
    ref = json.load(open(fixture("qwen2_trained_reference_loss.json")))
    back = to_hf(fixture("qwen2_trained"), str(tmp_path / "back"), "qwen2", vocab_size=200,
                 tokenizer=fixture("qwen2_hf"))
    assert json.load(open(os.path.join(back, "config.json")))["rms_norm_eps"] == 1e-6
    assert os.path.exists(os.path.join(back, "tokenizer.json"))
    tokens, labels = torch.tensor(ref["tokens"]), torch.tensor(ref["labels"])
    mask = torch.tensor(ref["loss_mask"])

    def loss_of(hf_dir):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True)
        padded = out.hidden_states[-1] @ _raw_output_rows(fixture("qwen2_trained"), slice(200, None)).T
        full = torch.cat([out.logits, padded], dim=-1)
        ce = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none")
        return float((ce * mask.flatten()).sum() / mask.sum())

    assert abs(loss_of(back) - ref["lm_loss"]) < 2e-5
    # The check can fail: the untrained source model is 1e-1 away on the same batch.
    assert abs(loss_of(fixture("qwen2_hf")) - ref["lm_loss"]) > 1e-2


def test_upstream_checkpoint_without_true_vocab_keeps_every_row_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        back = to_hf(fixture("qwen2_trained"), str(tmp_path / "padded"), "qwen2")
    assert "records no true vocab size" in caplog.text
    assert json.load(open(os.path.join(back, "config.json")))["vocab_size"] == 256


def _rewrite_rank(path: str, edit) -> None:
    payload = torch.load(path, weights_only=False)  # our own copy of a trusted fixture
    edit(payload)
    torch.save(payload, path)


def test_diverged_tied_copy_on_last_stage_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(fixture("qwen2_tp1pp2"), ckpt)
    last = os.path.join(ckpt, "iter_0000001", "mp_rank_00_001", "model_optim_rng.pt")
    _rewrite_rank(last, lambda p: p["model"]["output_layer.weight"][5].add_(0.01))
    with pytest.raises(CheckpointError, match=r"output_layer\.weight on the last pipeline stage differs"):
        to_hf(ckpt, str(tmp_path / "back"), "qwen2")
    assert not os.path.exists(tmp_path / "back")


@pytest.mark.parametrize("field,value", [("rotary_percent", 0.5), ("rotary_interleaved", True),
                                         ("layernorm_zero_centered_gamma", True), ("window_size", (64, 0))])
def test_upstream_args_canonical_cannot_express_are_refused_by_name(tmp_path, field, value):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(fixture("llama_tp2pp2"), ckpt)
    rank0 = os.path.join(ckpt, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt")
    _rewrite_rank(rank0, lambda p: setattr(p["args"], field, value))
    with pytest.raises(ValueError, match=re.escape(f"{ckpt}: checkpoint args: {field}={value!r}")):
        to_hf(ckpt, str(tmp_path / "back"), "llama")
    assert not os.path.exists(tmp_path / "back")


def test_megatron_core_built_from_upstream_args_gives_the_source_logits():
    """Our megatron-core runtime builds the model from the `args` upstream wrote (its names: `layernorm_epsilon`,
    enums, signal) at upstream's TP=2 PP=2 and computes the logits of the HF model the checkpoint came from."""
    from megatron_bridge.verify import verify
    report = verify(fixture("llama_hf"), fixture("llama_tp2pp2"), round_trip=False)
    assert report.logits.max_abs < 1e-4 and report.logits.positions > 0, report.logits


def _args(ckpt_dir: str):
    return open_legacy(ckpt_dir).args


def test_resharding_a_checkpoint_without_true_vocab_never_records_the_padded_size(tmp_path):
    """qwen2_trained records no true vocab (padded 256 at TP=1). Resharded to TP=2 the padded size stays 256: the
    output keeps the vocab unrecorded (no args.vocab_size, no record of ours) and converts back exactly as the
    source does. Where Megatron-LM's padding rule would need the true vocab, resharding is refused until it is
    given, and then honours --make-vocab-size-divisible-by."""
    src = fixture("qwen2_trained")
    tp2 = str(tmp_path / "tp2")
    convert(src, tp2, ConvertOptions(tp=2, pp=1, progress=False))
    a = _args(tp2)
    assert (a.tensor_model_parallel_size, a.padded_vocab_size, a.vocab_size) == (2, 256, None)
    assert a.exit_signal == _args(src).exit_signal  # the source run's args travel on
    assert not os.path.exists(os.path.join(tp2, "workbench.json"))
    one, two = (to_hf(d, str(tmp_path / f"hf_{i}"), "qwen2", vocab_size=200) for i, d in enumerate((src, tp2)))
    rt = compare_hf_dirs(one, two)
    assert rt.tensors_equal == rt.tensors_total > 0 and rt.config_equal

    with pytest.raises(ValueError, match=r"records no true vocab size.*Pass --vocab-size"):
        convert(src, str(tmp_path / "div96"), ConvertOptions(tp=2, make_vocab_size_divisible_by=96, progress=False))
    assert not os.path.exists(tmp_path / "div96")
    div96 = str(tmp_path / "div96")
    convert(src, div96, ConvertOptions(tp=2, make_vocab_size_divisible_by=96, vocab_size=200, progress=False))
    a = _args(div96)
    assert (a.padded_vocab_size, a.make_vocab_size_divisible_by, a.vocab_size) == (384, 96, 200)
    rt = compare_hf_dirs(one, to_hf(div96, str(tmp_path / "hf_div96"), "qwen2"))
    assert rt.tensors_equal == rt.tensors_total > 0


def test_upstream_torch_dist_checkpoint_with_optimizer_state(tmp_path):
    """qwen2_dist: the same training step saved in Megatron-LM's default format (torch_dist, optimizer included).
    Read through megatron-core's dist_checkpointing, it gives the same tensors as the legacy save of that step
    (upstream logged the same validation loss, 5.530757, on both)."""
    dist = to_hf(fixture("qwen2_dist"), str(tmp_path / "dist"), "qwen2", vocab_size=200)
    legacy = to_hf(fixture("qwen2_trained"), str(tmp_path / "legacy"), "qwen2", vocab_size=200)
    rt = compare_hf_dirs(legacy, dist)
    assert rt.tensors_equal == rt.tensors_total > 0 and not rt.missing and not rt.extra and rt.config_equal
