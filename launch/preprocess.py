"""JSONL -> one Megatron indexed dataset per channel, plus the blend line that trains on them.

``python -m launch preprocess INPUT.jsonl OUTPUT_PREFIX --tokenizer HF_DIR [--workers N]`` reads one JSON object a
line (``text``, optional ``channel``), tokenizes with the Hugging Face tokenizer in ``HF_DIR`` over a process pool,
and writes ``<OUTPUT_PREFIX>_<channel>_text_document.{bin,idx}`` through megatron-core's own ``IndexedDatasetBuilder``,
the names and layout Megatron-LM's ``tools/preprocess_data.py`` gives one ``--json-keys text`` output. Each channel is
one component of the printed ``--data-path`` blend, so ``BlendedDataset``'s ``dataset_id`` *is* the channel, which
is what the channel-loss patch for upstream Megatron-LM reads.

Tokenization follows ``preprocess_data.py`` on megatron-core 0.16 with a Hugging Face tokenizer: no special tokens
unless ``--tokenizer-hf-include-special-tokens``, the tokenizer's EOS appended to every non-empty document
(``--append-eod``, on by default here), documents with no tokens skipped (there is nothing to train on).

Everything is written into a temporary folder next to the outputs and renamed into place at the end, so a failure
(a malformed line, Ctrl-C) leaves no half-written dataset under the names training would read.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

# Channel names become file names and TensorBoard tags: keep them to characters every file system and shell accepts.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DTYPES = {"uint16": np.uint16, "int32": np.int32, "int64": np.int64}
SUFFIX = "text_document"  # what preprocess_data.py writes for --json-keys text at document level


def output_prefix(prefix: str, channel: str) -> str:
    """``<prefix>_<channel>_text_document``: the path prefix Megatron's ``--data-path`` takes for one channel."""
    return f"{prefix}_{channel}_{SUFFIX}"


@dataclass(frozen=True)
class Options:
    """What the workers need to turn one line into token ids (picklable: it travels to every worker)."""

    path: str
    tokenizer: str
    text_field: str = "text"
    channel_field: str = "channel"
    default_channel: str = "default"
    append_eod: bool = True
    include_special_tokens: bool = False


@dataclass
class Summary:
    """What a run wrote, per channel, in channel order."""

    prefixes: dict[str, str] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    skipped_empty: int = 0

    def blend(self, equal_weights: bool = False) -> list[str]:
        """The ``--data-path`` arguments: ``weight prefix`` pairs, weights proportional to tokens unless equal."""
        total = sum(self.tokens.values())
        out = []
        for name, prefix in self.prefixes.items():
            weight = 1.0 if equal_weights else self.tokens[name] / total
            out += [f"{weight:.6g}", prefix]
        return out


# Worker state: each pool process loads the tokenizer once (a tokenizer does not pickle cheaply).
_worker: dict = {}


def _init_worker(opts: Options) -> None:
    from transformers import AutoTokenizer

    _worker["opts"] = opts
    _worker["tok"] = AutoTokenizer.from_pretrained(opts.tokenizer)
    _worker["eod"] = _worker["tok"].eos_token_id


def _fail(opts: Options, lineno: int, problem: str) -> ValueError:
    return ValueError(f"{opts.path}:{lineno}: {problem}")


def encode_line(item: tuple[int, str]) -> tuple[int, str, np.ndarray] | None:
    """``(line number, raw line)`` -> ``(line number, channel, token ids)``; ``None`` for a blank line.

    Raises ValueError naming ``file:line`` for anything that is not a JSON object with a string text and, when
    present, a string channel with a file-name-safe name.
    """
    lineno, line = item
    opts: Options = _worker["opts"]
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg} at column {e.colno}); write one JSON object a line"
        raise _fail(opts, lineno, problem) from None
    if not isinstance(record, dict):
        raise _fail(opts, lineno, f"expected a JSON object, got {type(record).__name__}; write one object a line")
    if opts.text_field not in record:
        raise _fail(opts, lineno, f"no {opts.text_field!r} field (keys: {sorted(record)[:8]}); "
                                  "add it or pass --text-field")
    text = record[opts.text_field]
    if not isinstance(text, str):
        raise _fail(opts, lineno, f"{opts.text_field!r} must be a string, got {type(text).__name__}")
    channel = record.get(opts.channel_field)
    if channel is None:
        channel = opts.default_channel
    elif not isinstance(channel, str):
        raise _fail(opts, lineno, f"{opts.channel_field!r} must be a string (or absent), got "
                                  f"{type(channel).__name__} {channel!r}")
    if not CHANNEL_NAME.fullmatch(channel):
        raise _fail(opts, lineno, f"channel {channel!r} cannot name a file; use letters, digits, '.', '_', '-'")
    ids = _worker["tok"](text, add_special_tokens=opts.include_special_tokens)["input_ids"]
    if ids and opts.append_eod:
        ids = [*ids, _worker["eod"]]
    return lineno, channel, np.asarray(ids, dtype=np.int64)


def _numbered_lines(path: str, progress):
    """``(line number, line)`` from the file, advancing the byte-based progress bar as lines are read."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            progress.update(len(line.encode("utf-8")))
            yield lineno, line


def _existing_outputs(prefix: str) -> list[str]:
    """Datasets an earlier run wrote under this prefix (any channel)."""
    pattern = f"{glob.escape(prefix)}_*_{SUFFIX}"
    return sorted(glob.glob(pattern + ".bin") + glob.glob(pattern + ".idx"))


def preprocess(opts: Options, prefix: str, workers: int = 1, dtype: str = "auto", force: bool = False,
               progress: bool = True) -> Summary:
    """Tokenize ``opts.path`` into one indexed dataset per channel under ``prefix``; see the module docstring.

    Raises:
        ValueError: bad input (with ``file:line``), no documents, an unusable tokenizer or dtype.
        FileExistsError: outputs under ``prefix`` exist and ``force`` is False.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if not os.path.isfile(opts.path):
        raise ValueError(f"input {opts.path} is not a file; pass a JSONL file with one {{\"text\": ...}} a line")
    if workers < 1:
        raise ValueError(f"--workers {workers}: use 1 or more")
    if not CHANNEL_NAME.fullmatch(opts.default_channel):
        raise ValueError(f"--default-channel {opts.default_channel!r} cannot name a file; "
                         "use letters, digits, '.', '_', '-'")
    existing = _existing_outputs(prefix)
    if existing and not force:
        raise FileExistsError(f"{prefix}: outputs exist ({', '.join(existing[:4])}); pass --force to replace them "
                              "or choose another output prefix")
    try:
        tok = AutoTokenizer.from_pretrained(opts.tokenizer)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]  # one line: transformers' messages span several
        raise ValueError(f"tokenizer {opts.tokenizer} cannot be loaded ({type(e).__name__}: {reason}); pass "
                         "--tokenizer DIR, a folder with a Hugging Face tokenizer (tokenizer.json)") from None
    if opts.append_eod and tok.eos_token_id is None:
        raise ValueError(f"tokenizer {opts.tokenizer} has no eos_token to append as EOD; set one in its "
                         "tokenizer_config.json or pass --no-append-eod")
    vocab = len(tok)
    np_dtype = DType.optimal_dtype(vocab) if dtype == "auto" else DTYPES[dtype]
    if vocab - 1 > np.iinfo(np_dtype).max:
        raise ValueError(f"--dtype {dtype}: token ids go up to {vocab - 1}, beyond {np.dtype(np_dtype).name}; "
                         "use --dtype auto")

    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(prefix)}.", suffix=".tmp", dir=out_dir)
    summary = Summary()
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        pool = None
        if workers == 1:
            _init_worker(opts)
        else:
            # fork, not spawn: spawn re-runs the caller's __main__ in every worker (a `python -m launch` entry
            # point has no guard of its own to stop that). The pool starts before the progress bar's thread.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(opts,))
        bar = tqdm(total=os.path.getsize(opts.path), unit="B", unit_scale=True, desc="tokenize",
                   disable=not progress, file=sys.stderr)
        lines = _numbered_lines(opts.path, bar)
        # imap keeps input order, so N workers write byte-identical files to one worker.
        encoded = map(encode_line, lines) if pool is None else pool.imap(encode_line, lines, chunksize=64)
        try:
            for result in encoded:
                if result is None:
                    continue
                _lineno, channel, ids = result
                if ids.size == 0:
                    summary.skipped_empty += 1
                    continue
                if channel not in builders:
                    builders[channel] = IndexedDatasetBuilder(
                        os.path.join(tmp, os.path.basename(output_prefix(prefix, channel))) + ".bin", dtype=np_dtype)
                    summary.documents[channel] = summary.tokens[channel] = 0
                builders[channel].add_document(ids, [ids.size])
                summary.documents[channel] += 1
                summary.tokens[channel] += int(ids.size)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        if not builders:
            raise ValueError(f"{opts.path}: no document with tokens (blank or empty texts only); nothing to write")
        channels = sorted(builders)  # channel order = blend order = dataset_id, the same on every run
        for channel in channels:
            builders[channel].finalize(os.path.join(tmp, os.path.basename(output_prefix(prefix, channel))) + ".idx")
        targets = [output_prefix(prefix, c) + ext for c in channels for ext in (".bin", ".idx")]
        clash = [t for t in targets if os.path.exists(t)]
        if clash and not force:
            raise FileExistsError(f"{clash[0]} exists; pass --force to replace it or choose another output prefix")
        for target in targets:
            os.replace(os.path.join(tmp, os.path.basename(target)), target)
        summary.prefixes = {c: output_prefix(prefix, c) for c in channels}
        summary.documents = {c: summary.documents[c] for c in channels}
        summary.tokens = {c: summary.tokens[c] for c in channels}
        return summary
    finally:
        for builder in builders.values():
            if not builder.data_file.closed:
                builder.data_file.close()
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Positional or Megatron-LM's spelling (--input/--output-prefix/--tokenizer-model), whichever a user knows.
    p.add_argument("input_pos", nargs="?", metavar="INPUT", help="JSONL input (or --input)")
    p.add_argument("prefix_pos", nargs="?", metavar="OUTPUT_PREFIX", help="output path prefix (or --output-prefix)")
    p.add_argument("--input", help="JSONL input, one object a line")
    p.add_argument("--output-prefix", help="writes <prefix>_<channel>_text_document.{bin,idx}")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--text-field", default="text", help="JSON key of the document text (default text)")
    p.add_argument("--channel-field", default="channel", help="JSON key of the channel (default channel)")
    p.add_argument("--default-channel", default="default", help="channel of documents without one (default default)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's EOS to every document, as preprocess_data.py --append-eod (default on)")
    p.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                   help="let the tokenizer add its special tokens (e.g. BOS), as the Megatron-LM flag of this name")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="token id dtype in .bin; auto = uint16 below 65500 ids, else int32 (Megatron's choice)")
    p.add_argument("--equal-weights", action="store_true",
                   help="print a blend with equal weights instead of weights proportional to tokens")
    p.add_argument("--force", action="store_true", help="replace existing outputs under the prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    path = a.input or a.input_pos
    prefix = a.output_prefix or a.prefix_pos
    if not path or not prefix or (a.input and a.input_pos) or (a.output_prefix and a.prefix_pos):
        print("error: give INPUT and OUTPUT_PREFIX once each, positionally or as --input/--output-prefix",
              file=sys.stderr)
        return 2
    opts = Options(path=path, tokenizer=a.tokenizer, text_field=a.text_field, channel_field=a.channel_field,
                   default_channel=a.default_channel, append_eod=a.append_eod,
                   include_special_tokens=a.tokenizer_hf_include_special_tokens)
    try:
        s = preprocess(opts, prefix, workers=a.workers, dtype=a.dtype, force=a.force, progress=not a.no_progress)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, pre in s.prefixes.items():
        print(f"{name}: {s.documents[name]} documents, {s.tokens[name]} tokens -> {pre}.bin/.idx")
    if s.skipped_empty:
        print(f"skipped {s.skipped_empty} documents with no tokens")
    print("blend (pretrain_gpt.py):")
    print("  --data-path " + " ".join(s.blend(a.equal_weights)))
    print("  --channel-names " + " ".join(s.prefixes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
