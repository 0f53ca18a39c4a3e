"""torch_dist written and read by one process, streaming (torch_dist_writer / torch_dist_reader), held against real
megatron-core: the index it writes equals megatron-core's own `dist_checkpointing.save` key by key, megatron-core
loads it at another TP/PP and gives the Hugging Face logits, every direction round-trips bit-exactly (upstream
Megatron-LM's own torch_dist checkpoint included), and damaged or unknown input is refused with nothing written."""
import os
import pickle
import shutil

import pytest
import torch

from conftest import make_llama
from checkpoint_tools.errors import CheckpointError
from megatron_bridge import legacy_format, sidecar, torch_dist_format
from megatron_bridge.convert import ConvertOptions, convert
from megatron_bridge.mcore_launcher import run_mcore_jobs
from megatron_bridge.torch_dist_reader import TorchDistSource
from megatron_bridge.verify import compare_hf_dirs, compare_logits, hf_logits, probe_tokens

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron_lm")


def _make_qwen3(path: str, seed: int, **overrides) -> str:
    """A tiny random Qwen3 (per-head q/k norm) saved by `transformers` itself."""
    import transformers

    from conftest import TINY

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


# name -> (how the HF model is made, saved layout TP/PP/VPP, layout megatron-core loads it at or None, dtype)
CONFIGS = {
    # GQA, q/k/v, o and MLP biases (add_bias_linear), untied, interleaved pipeline
    "gqa_biases_untied_vpp": (lambda p: make_llama(p, seed=11, attention_bias=True, mlp_bias=True),
                              (1, 2, 2), (2, 1, 1), None),
    # per-head q/k norm, tied, one KV group split over TP=2
    "qknorm_tied_tp2": (lambda p: _make_qwen3(p, seed=12, num_key_value_heads=1, tie_word_embeddings=True),
                        (2, 1, 1), (1, 2, 1), None),
    # tied embeddings over two pipeline stages (megatron-core stores the embedding alone), bf16
    "tied_pp2_bf16": (lambda p: make_llama(p, seed=13, tie_word_embeddings=True, dtype=torch.bfloat16),
                      (1, 2, 1), None, "bfloat16"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """For each config: the HF model, its torch_dist checkpoint streamed from HF, and the same model saved by real
    megatron-core (legacy -> torchrun -> dist_checkpointing.save), plus megatron-core's logits of the streamed
    checkpoint loaded at another layout; one torchrun runs every megatron-core job."""
    root = tmp_path_factory.mktemp("td_stream")
    out, jobs = {}, []
    tokens = probe_tokens(250, batch=2, seq_len=16, seed=5)
    for name, (make, (tp, pp, vpp), load_at, _) in CONFIGS.items():
        hf = make(str(root / f"{name}_hf"))
        opts = dict(tp=tp, pp=pp, vpp=vpp, progress=False)
        streamed = str(root / f"{name}_stream")
        what, _ = convert(hf, streamed, ConvertOptions(format="torch_dist", **opts))
        assert what == "hf -> megatron torch_dist"
        legacy = str(root / f"{name}_legacy")
        convert(hf, legacy, ConvertOptions(**opts))
        reference = str(root / f"{name}_mcore")
        os.makedirs(reference)
        legacy_format.write_tracker(reference, None)
        sidecar.copy_sidecar(legacy, reference)  # as the megatron-core path did: config and tokenizer travel along
        jobs.append({"checkpoint": legacy, "task": "to_torch_dist", "out_dir": os.path.join(reference, "release"),
                     "iteration": None})
        out[name] = {"hf": hf, "streamed": streamed, "mcore": reference}
        if load_at:
            ltp, lpp, lvpp = load_at
            jobs.append({"checkpoint": streamed, "task": "logits", "tokens": tokens.tolist(), "tp": ltp, "pp": lpp,
                         "vpp": lvpp, "name": name})
    results = run_mcore_jobs(jobs, nproc=2)
    for job, res in zip(jobs, results):
        if job["task"] == "logits":
            out[job["name"]]["logits"] = (tokens, res["logits"])
    out["root"] = root
    return out


def _index(root: str) -> dict:
    md = torch_dist_format.read_dcp_metadata(root)
    return {k: (tuple(m.size), m.properties.dtype) if hasattr(m, "size") else type(m).__name__
            for k, m in md.state_dict_metadata.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_index_equals_megatron_cores_own_save(built, name):
    """Keys (byte objects included), global shapes and dtypes as megatron-core's dist_checkpointing.save writes
    them for the same model, the same common state, and the same tensors read back."""
    b = built[name]
    ours, theirs = _index(b["streamed"]), _index(b["mcore"])
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    want_dtype = getattr(torch, CONFIGS[name][3] or "float32")
    assert {d for v in ours.values() if isinstance(v, tuple) for d in [v[1]]} == {want_dtype}
    # The reference worker runs a bare GPTModel, whose norms megatron-core creates in fp32 whatever params_dtype
    # says; Megatron-LM wraps its model in Float16Module (module.bfloat16()), so a bf16 run saves bf16 norms, as
    # we do. Shapes always agree; dtypes agree everywhere else.
    differ = {k: (v, theirs[k]) for k, v in ours.items() if v != theirs[k]}
    assert all(k.endswith("norm.weight") or k.endswith("layer_norm_weight") for k in differ), differ
    assert all(o[0] == t[0] and (o[1], t[1]) == (torch.bfloat16, torch.float32) for o, t in differ.values())
    assert bool(differ) == (want_dtype == torch.bfloat16)
    if name == "tied_pp2_bf16":
        assert "output_layer.weight" not in ours and "embedding.word_embeddings.weight" in ours
    ours_common, theirs_common = (torch_dist_format.read_common(p) for p in (b["streamed"], b["mcore"]))
    assert vars(ours_common.pop("args")) == vars(theirs_common.pop("args"))
    assert ours_common == theirs_common
    a, m = TorchDistSource(b["streamed"]), TorchDistSource(b["mcore"])
    assert a.names() == m.names()
    for n in a.names():
        assert torch.equal(a.get(n), m.get(n).to(a.get(n).dtype)), n


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[2]])
def test_megatron_core_loads_the_stream_at_another_layout_with_hf_logits(built, name):
    tokens, got = built[name]["logits"]
    rep = compare_logits(hf_logits(built[name]["hf"], tokens), got, 1e-4)
    assert rep.ok and rep.argmax_agree == rep.positions, rep


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trips_are_bit_exact(built, name, tmp_path):
    """torch_dist -> HF from our stream and from megatron-core's own save; torch_dist -> legacy at another layout
    -> torch_dist -> HF; torch_dist -> torch_dist at another layout."""
    b = built[name]
    # (megatron-core's own bf16 save holds fp32 norms, see above: its values were compared there)
    for src in (b["streamed"],) + ((b["mcore"],) if CONFIGS[name][3] is None else ()):
        back = str(tmp_path / f"back_{os.path.basename(src)}")
        assert convert(src, back, ConvertOptions(progress=False))[0] == "megatron torch_dist -> hf"
        rt = compare_hf_dirs(b["hf"], back)
        assert rt.ok and rt.tensors_equal == rt.tensors_total > 0, (rt.mismatched, rt.config_diff)
    legacy = str(tmp_path / "legacy")
    convert(b["streamed"], legacy, ConvertOptions(tp=2, pp=1, vpp=1, format="legacy", progress=False))
    assert (legacy_format.open_legacy(legacy).tp, legacy_format.open_legacy(legacy).pp) == (2, 1)
    again = str(tmp_path / "again")
    assert convert(legacy, again, ConvertOptions(pp=2, format="torch_dist", progress=False))[0] == \
        "megatron legacy -> megatron torch_dist"
    args = torch_dist_format.read_common(again)["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert _index(again) == _index(b["streamed"])
    back = str(tmp_path / "back_again")
    convert(again, back, ConvertOptions(progress=False))
    assert compare_hf_dirs(b["hf"], back).tensors_equal == compare_hf_dirs(b["hf"], back).tensors_total


def test_upstream_megatron_lm_torch_dist_streams_bit_exact(tmp_path, caplog):
    """qwen2_dist (upstream Megatron-LM, Transformer Engine names, optimizer and RNG state): read by the stream it
    gives the tensors of the same step saved as legacy, says it drops the optimizer state, and re-written as
    torch_dist (at another TP) and read again it is unchanged."""
    dist = str(tmp_path / "dist_hf")
    with caplog.at_level("WARNING"):
        convert(os.path.join(FIXTURES, "qwen2_dist"), dist, ConvertOptions(vocab_size=200, progress=False))
    assert "holds optimizer state" in caplog.text and "optimizer state entries" in caplog.text
    legacy = str(tmp_path / "legacy_hf")
    convert(os.path.join(FIXTURES, "qwen2_trained"), legacy, ConvertOptions(vocab_size=200, progress=False))
    rt = compare_hf_dirs(legacy, dist)
    assert rt.tensors_equal == rt.tensors_total > 0 and not rt.missing and not rt.extra
    src = TorchDistSource(os.path.join(FIXTURES, "qwen2_dist"), vocab_size=200)
    assert src.skipped["optimizer state"] > 0 and src.skipped["RNG state"] > 0
    assert src.skipped["Transformer Engine extra state"] == 16
    rewritten = str(tmp_path / "rewritten")
    convert(os.path.join(FIXTURES, "qwen2_dist"), rewritten, ConvertOptions(tp=2, format="torch_dist",
                                                                            vocab_size=200, progress=False))
    assert torch_dist_format.read_common(rewritten)["args"].tensor_model_parallel_size == 2
    again = str(tmp_path / "again_hf")
    convert(rewritten, again, ConvertOptions(progress=False))
    rt = compare_hf_dirs(dist, again)
    assert rt.tensors_equal == rt.tensors_total > 0


# ---- bad input: each damage is refused with a one-line reason naming the file or key; nothing is written ----

def _rewrite_index(root: str, change) -> None:
    path = os.path.join(root, "release", ".metadata")
    md = torch_dist_format.read_dcp_metadata(root)
    change(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


def _drop_chunk(md):
    m = md.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
    m.chunks = m.chunks[:-1]


def _chunk_out_of_bounds(md):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    m = md.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
    c = m.chunks[-1]
    m.chunks[-1] = ChunkStorageMetadata(offsets=torch.Size([c.offsets[0] + 1] + list(c.offsets[1:])), sizes=c.sizes)


def _overlapping_chunks(md):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    m = md.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
    first = m.chunks[0]
    # layer 0 stored twice, layer 1 not at all: the volume adds up, the tiling does not
    m.chunks[1] = ChunkStorageMetadata(offsets=first.offsets, sizes=first.sizes)


def _unknown_key(md):
    md.state_dict_metadata["decoder.layers.mlp.mystery.weight"] = md.state_dict_metadata[
        "decoder.layers.mlp.linear_fc2.weight"]


def _unimplied_key(md):  # a tied model with an output layer
    md.state_dict_metadata["output_layer.weight"] = md.state_dict_metadata["embedding.word_embeddings.weight"]


def _two_names(md):  # the input norm under its local-spec name beside its Transformer Engine name
    md.state_dict_metadata["decoder.layers.input_layernorm.weight"] = md.state_dict_metadata[
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"]


def _local_names(md):
    """The norms under the local-spec names older writers used (`input_layernorm`, `pre_mlp_layernorm`)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    for te, local in (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
                      ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")):
        te, local = "decoder.layers." + te, "decoder.layers." + local
        md.state_dict_metadata[local] = md.state_dict_metadata.pop(te)
        for index in [i for i in md.storage_data if i.fqn == te]:
            md.storage_data[MetadataIndex(local, index.offset)] = md.storage_data.pop(index)


def test_local_spec_names_are_read_as_their_transformer_engine_keys(built, tmp_path):
    src = str(tmp_path / "local_names")
    shutil.copytree(built["gqa_biases_untied_vpp"]["streamed"], src)
    _rewrite_index(src, _local_names)
    assert "decoder.layers.input_layernorm.weight" in _index(src)
    back = str(tmp_path / "back")
    convert(src, back, ConvertOptions(progress=False))
    rt = compare_hf_dirs(built["gqa_biases_untied_vpp"]["hf"], back)
    assert rt.ok and rt.tensors_equal == rt.tensors_total > 0


def _missing_key(md):
    del md.state_dict_metadata["decoder.final_layernorm.weight"]


def _wrong_global_shape(md):
    m = md.state_dict_metadata["decoder.final_layernorm.weight"]
    m.size = torch.Size([m.size[0] + 1])


def _chunk_without_storage(md):
    key = next(i for i in md.storage_data if i.fqn == "decoder.layers.mlp.linear_fc2.weight")
    del md.storage_data[key]


def _blob_with_wrong_shape(root):
    md = torch_dist_format.read_dcp_metadata(root)
    index = next(i for i in md.storage_data if i.fqn == "decoder.final_layernorm.weight")
    _replace_blob(root, md, index, torch.zeros(3))


def _hostile_blob(root):
    md = torch_dist_format.read_dcp_metadata(root)
    index = next(i for i in md.storage_data if i.fqn == "decoder.final_layernorm.weight")
    _replace_blob(root, md, index, _Hostile())


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _replace_blob(root, md, index, obj):
    """Point one chunk at a new blob holding `obj` (appended to a new file, so the sizes stay consistent)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    path = os.path.join(root, "release", "__9_0.distcp")
    torch.save(obj, path)
    md.storage_data[index] = _StorageInfo(relative_path="__9_0.distcp", offset=0, length=os.path.getsize(path))
    with open(os.path.join(root, "release", ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _corrupt_blob(root):
    md = torch_dist_format.read_dcp_metadata(root)
    info = next(s for i, s in md.storage_data.items() if i.fqn == "decoder.layers.mlp.linear_fc2.weight")
    with open(os.path.join(root, "release", info.relative_path), "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * 64)


def _truncate_distcp(root):
    it = os.path.join(root, "release")
    name = sorted(n for n in os.listdir(it) if n.endswith(".distcp"))[0]
    with open(os.path.join(it, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(it, name)) // 2)


def _remove_distcp(root):
    it = os.path.join(root, "release")
    os.remove(os.path.join(it, sorted(n for n in os.listdir(it) if n.endswith(".distcp"))[0]))


BAD_INPUT = {
    "truncated .distcp": (_truncate_distcp, r"__0_0\.distcp is truncated"),
    "missing .distcp": (_remove_distcp, r"__0_0\.distcp is missing"),
    "a chunk missing": (lambda r: _rewrite_index(r, _drop_chunk), r"linear_fc2\.weight: the chunks cover \d+ of"),
    "a chunk out of bounds": (lambda r: _rewrite_index(r, _chunk_out_of_bounds), r"outside the global shape"),
    "overlapping chunks": (lambda r: _rewrite_index(r, _overlapping_chunks), r"linear_fc2\.weight: chunks at .* overlap"),
    "a chunk with no storage": (lambda r: _rewrite_index(r, _chunk_without_storage), r"no storage entry"),
    "unknown key": (lambda r: _rewrite_index(r, _unknown_key), r"no GPT model parameter .*mlp\.mystery\.weight"),
    "key the args do not imply": (lambda r: _rewrite_index(r, _unimplied_key), r"do not imply \['output_layer"),
    "a parameter under two names": (lambda r: _rewrite_index(r, _two_names), r"layer_norm_weight is stored under "
                                                                             r"two names"),
    "missing model key": (lambda r: _rewrite_index(r, _missing_key), r"missing model keys \['decoder\.final_lay"),
    "wrong global shape": (lambda r: _rewrite_index(r, _wrong_global_shape), r"final_layernorm\.weight: global shape"),
    "blob of another shape": (_blob_with_wrong_shape, r"__9_0\.distcp \(chunk of 'decoder\.final_layernorm\.weight'.*"
                                                      r"holds \(3,\)"),
    "corrupt blob": (_corrupt_blob, r"chunk of 'decoder\.layers\.mlp\.linear_fc2\.weight'.*truncated or not a torch"),
    "hostile blob": (_hostile_blob, r"__9_0\.distcp.*(posix|os)\b.*system"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_torch_dist_is_refused_and_nothing_written(built, case, tmp_path):
    damage, message = BAD_INPUT[case]
    bad = str(tmp_path / "bad")
    shutil.copytree(built["tied_pp2_bf16"]["streamed"], bad)
    damage(bad)
    for target in (ConvertOptions(progress=False), ConvertOptions(tp=2, format="torch_dist", progress=False)):
        with pytest.raises(CheckpointError, match=message):
            convert(bad, str(tmp_path / "out"), target)
        assert not os.path.exists(tmp_path / "out")
        assert sorted(os.listdir(tmp_path)) == ["bad"]  # no partial output or scratch folder left
