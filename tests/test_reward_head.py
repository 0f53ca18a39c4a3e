"""Reward models (`…ForSequenceClassification`, `score.weight`, TRL's num_labels=1) through the converters.

A tiny random reward model of each family that `transformers` has a sequence classifier for converts to workbench,
scores left- and right-padded batches as the family's own `transformers` class does, and comes back to its family
bit for bit with its head config (architectures, id2label/label2id, pad_token_id). A family with no sequence
classifier refuses the head by name reading and writing, and so does Megatron (GPTModel has no such head); nothing
is written then.
"""
import json
import os

import pytest
import torch
import transformers

from conftest import TINY
from test_workbench_model import randomize
from checkpoint_tools.family_convert import convert_family
from checkpoint_tools.modeling_workbench import WorkbenchForSequenceClassification
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.inspect_checkpoint import inspect, render
from megatron_bridge.verify import compare_hf_dirs

PAD = 0
# family -> (config class, classifier class, config overrides): every canonical option a family's classifier has
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", {"attention_bias": True, "head_dim": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForSequenceClassification", {"head_dim": 24}),
    "mistral": ("MistralConfig", "MistralForSequenceClassification", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForSequenceClassification", {}),
    "gemma": ("GemmaConfig", "GemmaForSequenceClassification", {"head_dim": 16}),
}
HEAD_KEYS = ("architectures", "id2label", "label2id", "pad_token_id", "tie_word_embeddings")


def _save_reward_model(family: str, path: str, num_labels: int = 1, **extra) -> torch.nn.Module:
    cfg_cls, cls, overrides = FAMILIES[family]
    torch.manual_seed(sum(map(ord, family)))
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **overrides, **extra, "num_labels": num_labels,
                                            "pad_token_id": PAD})
    randomize(getattr(transformers, cls)(cfg)).save_pretrained(path)
    return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()  # as users load it


def _padded(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


SEQS = [[5, 9, 11, 2], [7, 3, 2], [8, 17, 8, 40, 8, 4, 2]]  # no pad token inside a sequence


def _scores(model, side: str) -> torch.Tensor:
    with torch.no_grad():
        return model(*_padded(SEQS, side)).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_reward_model_to_workbench_scores_alike_and_back_bit_exact(family, tmp_path):
    src, wb, back = (str(tmp_path / n) for n in ("src", "wb", "back"))
    ref = _save_reward_model(family, src)
    convert_family(src, wb, "workbench", progress=False)
    cfg = json.load(open(os.path.join(wb, "config.json")))
    assert cfg["architectures"] == ["WorkbenchForSequenceClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0} and cfg["pad_token_id"] == PAD
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(wb).eval()
    assert isinstance(rm, WorkbenchForSequenceClassification) and rm.num_labels == 1
    fast = WorkbenchForSequenceClassification.from_pretrained(wb, skip_build=True)
    for side in ("right", "left"):
        want = _scores(ref, side)
        got, got_fast = _scores(rm, side), _scores(fast, side)
        print(f"\n{family} {side}-padded: max |workbench - {type(ref).__name__}| = "
              f"{(got - want).abs().max().item():.2e}")
        assert got.shape == (len(SEQS), 1)
        assert torch.allclose(got, want, atol=1e-5, rtol=0) and torch.equal(got, got_fast)
    convert_family(wb, back, family, progress=False)
    # Gemma folds (1 + w) into its norms: it comes back as its own trip through canonical, as `verify` compares
    reference = convert_family(src, str(tmp_path / "trip"), family, progress=False) if family == "gemma" else src
    rt = compare_hf_dirs(reference, back)
    assert rt.tensors_equal == rt.tensors_total > 0 and not rt.missing and not rt.extra, rt
    src_cfg, back_cfg = (json.load(open(os.path.join(d, "config.json"))) for d in (src, back))
    assert {k: back_cfg.get(k) for k in HEAD_KEYS} == {k: src_cfg.get(k) for k in HEAD_KEYS}
    # and the family's own class loads it with the same scores (the family's passthrough keys, e.g. Qwen2's
    # layer_types, do not cross families: they are written as the family's defaults, which may pick another
    # mask path, hence not bit-equal)
    again = transformers.AutoModelForSequenceClassification.from_pretrained(back).eval()
    assert torch.allclose(_scores(again, "left"), _scores(ref, "left"), atol=1e-6, rtol=0)


def test_labels_and_a_same_family_trip_keep_the_config_exactly(tmp_path):
    """A 3-label classifier with its own label names: qwen2 -> workbench -> qwen2 keeps them, and qwen2 -> qwen2
    writes the source config back key for key."""
    src, wb, back, same = (str(tmp_path / n) for n in ("src", "wb", "back", "same"))
    labels = {0: "bad", 1: "neutral", 2: "good"}
    ref = _save_reward_model("qwen2", src, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    convert_family(src, wb, "workbench", progress=False)
    assert "score.weight, num_labels=3 (sequence classification" in render(inspect(wb))
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(wb).eval()
    assert rm.config.id2label == labels and rm.score.weight.shape == (3, TINY["hidden_size"])
    assert torch.allclose(_scores(rm, "left"), _scores(ref, "left"), atol=1e-5, rtol=0)
    convert_family(wb, back, "qwen2", progress=False)
    convert_family(src, same, "qwen2", progress=False)
    src_cfg = json.load(open(os.path.join(src, "config.json")))
    for out in (back, same):
        rt = compare_hf_dirs(src, out)
        assert rt.tensors_equal == rt.tensors_total > 0 and not rt.missing and not rt.extra
    assert json.load(open(os.path.join(back, "config.json")))["id2label"] == src_cfg["id2label"]
    assert compare_hf_dirs(src, same).config_equal


def test_families_without_a_classifier_and_megatron_refuse_the_head(tmp_path):
    src = str(tmp_path / "src")
    _save_reward_model("llama", src)
    for family, cls in (("granite", "GraniteForCausalLM"), ("internlm2", "InternLM2ForCausalLM"),
                        ("baichuan", "BaichuanForCausalLM")):
        dst = str(tmp_path / family)
        with pytest.raises(ValueError, match=rf"score\.weight \[1, 64\]\) cannot be written as {family}: {cls} has "
                                             rf"no ForSequenceClassification counterpart.*families with one: .*llama"):
            convert_family(src, dst, family, progress=False)
        assert not os.path.exists(dst)
    mg = str(tmp_path / "mg")
    with pytest.raises(ValueError, match=r"sequence-classification \(reward\) model \(score\.weight \[1, 64\], no "
                                         r"lm_head\); Megatron's GPTModel has no such head, so nothing was written"):
        convert(src, mg, ConvertOptions(tp=1, progress=False))
    assert not os.path.exists(mg) and sorted(os.listdir(tmp_path)) == ["src"]
    # reading: a family with no classifier whose config claims one
    granite = str(tmp_path / "granite_src")
    transformers.GraniteForCausalLM(transformers.GraniteConfig(**TINY)).save_pretrained(granite)
    cfg_path = os.path.join(granite, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "architectures": ["GraniteForSequenceClassification"]}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"cannot be read as granite: GraniteForCausalLM has no "
                                         r"ForSequenceClassification counterpart"):
        convert_family(granite, str(tmp_path / "out"), "llama", progress=False)
    assert not os.path.exists(tmp_path / "out")
