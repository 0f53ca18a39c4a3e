"""Pipeline placement is a pure global <-> local layer map (with virtual stages)."""
import pytest

from megatron_bridge.layout import Arch, global_params, stage_layers


@pytest.mark.parametrize("layers,pp,vpp", [(4, 1, 1), (4, 2, 1), (8, 2, 2), (12, 3, 2), (8, 4, 1)])
def test_stage_layers_cover_every_layer_once(layers, pp, vpp):
    stages = stage_layers(layers, pp, vpp)
    seen = sorted(i for ids in stages.values() for i in ids)
    assert seen == list(range(layers))
    per = layers // (pp * vpp)
    for (p, v), ids in stages.items():
        # Megatron's interleaved assignment: consecutive layers from (v * PP + p) * per, local index = position
        assert ids == list(range((v * pp + p) * per, (v * pp + p + 1) * per))


def test_vpp_example():
    # 8 layers, PP=2, VPP=2: stage 0 holds [0,1] and [4,5]; stage 1 holds [2,3] and [6,7]
    s = stage_layers(8, 2, 2)
    assert s[(0, 0)] == [0, 1] and s[(1, 0)] == [2, 3] and s[(0, 1)] == [4, 5] and s[(1, 1)] == [6, 7]


def test_bad_pipeline_sizes_name_valid_choices():
    with pytest.raises(ValueError, match=r"num_layers=30 is not divisible by PP\*VPP=4\*1; with VPP=1 use PP in"):
        stage_layers(30, 4, 1)
    with pytest.raises(ValueError, match="needs PP >= 2"):
        stage_layers(4, 1, 2)


def test_tied_output_layer_only_on_a_separate_last_stage():
    tied = Arch(qkv_bias=False, linear_bias=False, qk_layernorm=False, untie=False)
    names = lambda p, v, pp, vpp: [param.local for param, _ in global_params(tied, p, v, pp, vpp)]
    assert names(0, 0, 1, 1) == ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    assert names(1, 0, 2, 1) == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert names(1, 1, 2, 2) == ["decoder.final_layernorm.weight", "output_layer.weight"]
    assert names(1, 0, 2, 2) == []
