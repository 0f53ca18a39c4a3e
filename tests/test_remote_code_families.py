"""InternLM2, Baichuan2 and Yi (remote code, no `transformers` class) held to their own published arithmetic.

A random checkpoint in each family's own layout goes through the project's conversion to Llama; the logits of
`LlamaForCausalLM` on the result must equal those of a forward pass written from the family's modeling code
(tests/_remote_code_reference.py), which never consults the project's family tables. A table that misreads a
packed layout (InternLM2's per-group wqkv, Baichuan2's W_pack or NormHead, Yi's ln1/ln2) fails here even when the
round trips, which only prove the table agrees with itself, pass.
"""
import pytest
import torch
import transformers

from _remote_code_reference import FAMILIES, reference_logits, write_checkpoint
from checkpoint_tools.family_convert import convert_family
from megatron_bridge.verify import probe_tokens

TOL = 1e-5  # fp32; seen: about 1e-6 on these shapes
# 8 query heads: InternLM2 and Yi in 2 KV groups of 4 (so a within-group misreading shows), Baichuan2 without GQA.
SHAPES = {"internlm2": dict(num_attention_heads=8, num_key_value_heads=2),
          "baichuan": dict(num_attention_heads=8),
          "Yi": dict(num_attention_heads=8, num_key_value_heads=2)}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_conversion_computes_what_the_published_code_computes(family, tmp_path):
    src = write_checkpoint(str(tmp_path / "src"), family, seed=11, **SHAPES[family])
    tokens = probe_tokens(128, batch=2, seq_len=24, seed=5)
    want = reference_logits(src, tokens)
    dst = convert_family(src, str(tmp_path / "llama"), "llama", progress=False)
    with torch.no_grad():
        got = transformers.LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()(tokens).logits
    diff = (got - want).abs().max().item()
    print(f"\n{family} -> llama vs its published forward: max abs logits diff {diff:.2e}")
    assert want.abs().max() > 1.0  # logits of a size where a misread layout shows
    assert diff <= TOL
