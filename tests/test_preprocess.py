"""`python -m launch preprocess`: what it writes is read back by megatron-core's own readers, token for token.

The datasets go through megatron-core's ``IndexedDataset`` and through ``BlendedMegatronDatasetBuilder`` +
``GPTDataset`` with a blend (what Megatron-LM's ``pretrain_gpt.py`` builds from ``--data-path``), and must give
exactly the tokenizer's ids of each text plus EOD, per channel, every document once. Bad input fails with
``file:line`` and leaves nothing behind.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch.preprocess import Options, output_prefix, preprocess

WORDS = "the a cat dog sat on mat ran far def return print x y z web page link click".split()


def make_tokenizer(path: str, eos: bool = True) -> str:
    """A word-level Hugging Face tokenizer folder built here (no hub download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "<eos>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", **extra).save_pretrained(path)
    return path


def records(n: int = 120, seed: int = 0) -> list[dict]:
    """Documents of three channels (one implicit: no `channel` key), varied lengths, some with unknown words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(1, 40)))]
        if i % 7 == 0:
            words.append("unseen")  # <unk>: ids must still match the tokenizer's
        rec = {"text": " ".join(words)}
        kind = i % 3
        if kind == 0:
            rec["channel"] = "web"
        elif kind == 1:
            rec["channel"] = "code"
        out.append(rec)
    return out


def write_jsonl(path, recs, raw_lines=()) -> str:
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def expected_documents(tok_dir: str, recs: list[dict], default: str = "default") -> dict[str, list[list[int]]]:
    """The tokenizer's own ids of each text + EOS, grouped by channel in input order (independent of preprocess)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    docs: dict[str, list[list[int]]] = {}
    for r in recs:
        ids = tok(r["text"], add_special_tokens=False)["input_ids"]
        if ids:
            docs.setdefault(r.get("channel") or default, []).append(ids + [tok.eos_token_id])
    return docs


def read_indexed(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document, as preprocess_data.py writes
    return [ds[i].tolist() for i in range(len(ds))]


def test_indexed_datasets_hold_each_text_plus_eod_per_channel(tmp_path, tok_dir):
    recs = records() + [{"text": "", "channel": "web"}]  # an empty text: nothing to train on, skipped
    src = write_jsonl(tmp_path / "in.jsonl", recs, raw_lines=["", "   "])  # blank lines are skipped
    prefix = str(tmp_path / "out" / "mix")
    summary = preprocess(Options(path=src, tokenizer=tok_dir), prefix, progress=False)

    want = expected_documents(tok_dir, recs)
    assert list(summary.prefixes) == sorted(want) == ["code", "default", "web"]  # blend order: sorted names
    assert summary.skipped_empty == 1
    for channel, docs in want.items():
        pre = output_prefix(prefix, channel)
        assert pre == f"{prefix}_{channel}_text_document"  # preprocess_data.py's naming
        assert read_indexed(pre) == docs
        assert summary.documents[channel] == len(docs)
        assert summary.tokens[channel] == sum(map(len, docs))
        with open(pre + ".idx", "rb") as f:
            f.seek(9 + 8)  # header, version
            assert f.read(1) == bytes([8])  # dtype code 8 = uint16: megatron's optimal dtype for a 23-id vocab
    # Nothing but the datasets is left in the output folder (no temp dir).
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"mix_{c}_text_document{e}" for c in want for e in (".bin", ".idx"))


def test_gpt_dataset_blend_reads_exactly_the_token_stream(tmp_path, tok_dir):
    """Megatron's GPTDataset, built by BlendedMegatronDatasetBuilder from the printed blend, serves windows of each
    channel's token stream: every sample's tokens are the stream of its own channel (dataset_id), every document of
    a channel is in that stream once."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    recs = records(90, seed=1)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    prefix = str(tmp_path / "mix")
    summary = preprocess(Options(path=src, tokenizer=tok_dir), prefix, progress=False)
    blend = summary.blend()
    prefixes, weights = blend[1::2], [float(w) for w in blend[0::2]]
    assert abs(sum(weights) - 1) < 1e-5
    want = expected_documents(tok_dir, recs)

    class Tok:  # what GPTDataset asks of a tokenizer
        vocab_size, eod = 23, 1
        unique_identifiers = {"class": "test", "vocab_size": 23}

    seq = 16
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=(prefixes, weights), split="100,0,0",
                              tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=None, mmap_bin_files=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 0, 0], lambda: True, config).build()
    assert isinstance(train, BlendedDataset)
    seen = set()
    for i in range(len(train)):
        item = train[i]
        channel_id = int(item["dataset_id"])
        gpt = train.datasets[channel_id]
        assert gpt.dataset_path == prefixes[channel_id]
        # The channel's token stream in the document order this GPTDataset drew (epochs repeat documents).
        docs = IndexedDataset(prefixes[channel_id])
        stream = np.concatenate([docs[int(d)] for d in gpt.document_index])
        j = int(gpt.shuffle_index[int(train.dataset_sample_index[i])])
        window = stream[j * seq: (j + 1) * seq + 1]
        assert item["tokens"].tolist() == window[:-1].tolist()
        assert item["labels"].tolist() == window[1:].tolist()
        seen.add(channel_id)
    assert seen == {0, 1, 2}
    for channel_id, name in enumerate(summary.prefixes):
        gpt = train.datasets[channel_id]
        # The document index repeats every document of the channel the same number of times (once per epoch).
        counts = np.bincount(np.asarray(gpt.document_index), minlength=len(want[name]))
        assert len(counts) == len(want[name]) and counts.min() == counts.max() >= 1


def test_workers_write_the_same_bytes_as_one_process(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", records(400, seed=2))
    one = preprocess(Options(path=src, tokenizer=tok_dir), str(tmp_path / "one" / "d"), progress=False)
    many = preprocess(Options(path=src, tokenizer=tok_dir), str(tmp_path / "many" / "d"), workers=2, progress=False)
    assert one.tokens == many.tokens and one.documents == many.documents
    for channel in one.prefixes:
        for ext in (".bin", ".idx"):
            with open(one.prefixes[channel] + ext, "rb") as a, open(many.prefixes[channel] + ext, "rb") as b:
                assert a.read() == b.read(), (channel, ext)


def test_cli_prints_the_blend_and_counts(tmp_path, tok_dir, capsys):
    from launch.cli import main

    recs = [{"text": "the cat sat", "channel": "web"}, {"text": "def x", "channel": "code"},
            {"text": "the dog ran far", "channel": "web"}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    # Megatron-LM's spelling of the flags, and --no-append-eod.
    rc = main(["preprocess", "--input", src, "--output-prefix", str(tmp_path / "m"), "--tokenizer-model", tok_dir,
               "--no-append-eod", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "web: 2 documents, 7 tokens" in out and "code: 1 documents, 2 tokens" in out
    code, web = str(tmp_path / "m_code_text_document"), str(tmp_path / "m_web_text_document")
    assert f"--data-path 0.222222 {code} 0.777778 {web}" in out
    assert "--channel-names code web" in out
    assert read_indexed(web) == [[3, 5, 7], [3, 6, 10, 11]]  # no EOS appended

    rc = main(["preprocess", src, str(tmp_path / "m"), "--tokenizer", tok_dir, "--equal-weights", "--force",
               "--no-progress"])
    assert rc == 0 and f"--data-path 1 {code} 1 {web}" in capsys.readouterr().out
    assert read_indexed(web) == [[3, 5, 7, 1], [3, 6, 10, 11, 1]]  # --force replaced them, EOS appended


BAD_LINES = [
    ('{"text": "the cat"', "in.jsonl:3: not valid JSON"),
    ('["the cat"]', "in.jsonl:3: expected a JSON object, got list"),
    ('{"body": "the cat"}', "in.jsonl:3: no 'text' field"),
    ('{"text": 42}', "in.jsonl:3: 'text' must be a string, got int"),
    ('{"text": null}', "in.jsonl:3: 'text' must be a string, got NoneType"),
    ('{"text": "the", "channel": 7}', "in.jsonl:3: 'channel' must be a string (or absent), got int 7"),
    ('{"text": "the", "channel": ["web"]}', "in.jsonl:3: 'channel' must be a string (or absent), got list"),
    ('{"text": "the", "channel": "../etc"}', "in.jsonl:3: channel '../etc' cannot name a file"),
    ('{"text": "the", "channel": ""}', "in.jsonl:3: channel '' cannot name a file"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m.split(": ", 1)[1][:24] for _, m in BAD_LINES])
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, tok_dir, line, message, workers):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat", "channel": "web"}, {"text": "a dog"}],
                      raw_lines=[line, '{"text": "the end"}'])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        preprocess(Options(path=src, tokenizer=tok_dir), str(tmp_path / "out" / "d"), workers=workers,
                   progress=False)
    assert os.listdir(tmp_path / "out") == []  # no dataset, no temp folder


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n{"text": "   "}\n'],
                         ids=["empty", "blank", "no-tokens"])
def test_input_without_documents_is_refused(tmp_path, tok_dir, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError, match="no document with tokens"):
        preprocess(Options(path=str(src), tokenizer=tok_dir), str(tmp_path / "d"), progress=False)


def test_existing_outputs_are_kept_unless_force(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat", "channel": "web"}])
    prefix = str(tmp_path / "d")
    preprocess(Options(path=src, tokenizer=tok_dir), prefix, progress=False)
    target = output_prefix(prefix, "web") + ".bin"
    before = open(target, "rb").read()
    write_jsonl(tmp_path / "in.jsonl", [{"text": "the dog ran", "channel": "web"}])
    with pytest.raises(FileExistsError, match="pass --force"):
        preprocess(Options(path=src, tokenizer=tok_dir), prefix, progress=False)
    assert open(target, "rb").read() == before
    preprocess(Options(path=src, tokenizer=tok_dir), prefix, force=True, progress=False)
    assert read_indexed(output_prefix(prefix, "web")) == [[3, 6, 10, 1]]


def test_tokenizer_without_eos_needs_no_append_eod(tmp_path):
    tok = make_tokenizer(str(tmp_path / "tok"), eos=False)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat"}])
    with pytest.raises(ValueError, match="no eos_token.*--no-append-eod"):
        preprocess(Options(path=src, tokenizer=tok), str(tmp_path / "d"), progress=False)
    s = preprocess(Options(path=src, tokenizer=tok, append_eod=False), str(tmp_path / "d"), progress=False)
    assert read_indexed(s.prefixes["default"]) == [[3, 5]]


def test_missing_input_and_bad_default_channel(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="is not a file"):
        preprocess(Options(path=str(tmp_path / "nope.jsonl"), tokenizer=tok_dir), str(tmp_path / "d"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat"}])
    (tmp_path / "not_a_tokenizer").mkdir()
    with pytest.raises(ValueError, match="not_a_tokenizer cannot be loaded .*pass --tokenizer DIR"):
        preprocess(Options(path=src, tokenizer=str(tmp_path / "not_a_tokenizer")), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="--default-channel 'a b'"):
        preprocess(Options(path=src, tokenizer=tok_dir, default_channel="a b"), str(tmp_path / "d"))
