"""Post-pretraining on the Hugging Face Trainer: raw text packed into fixed blocks, one loss curve per data channel.

Run as ``python -m launch.pretrain_hf ...``, ``torchrun --nproc_per_node N -m launch.pretrain_hf ...`` or
``deepspeed --num_gpus N launch/pretrain_hf.py ...``. Data: JSONL with ``text`` and an optional ``channel``. Start from
a pretrained checkpoint (``--model``) or from a config (``--config``, from scratch). ``--smoke`` runs the whole
pipeline on a small slice first. See ``--help``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

from launch import exit_signal
from launch.pretrain_hf_data import REMAINDER_POLICY

EPILOG = f"""\
data: one JSON object per line, {{"text": "...", "channel": "<name>"}} ("channel" optional, a string).
blocks: {REMAINDER_POLICY}. A block that spans sources attributes each token's loss to its own channel.

channel loss: with --channel-loss auto (default) it is on when any text names a channel. Each logging window logs
channel_loss/<name> (token mean over the window, all ranks, one all_reduce) and channel_tokens/<name>; evaluation
logs eval_channel_loss/<name>. Render the curves: python -m launch.plot_channel_loss OUTPUT_DIR --out curves.png

Any transformers.TrainingArguments field can be given in its own spelling and is passed through, e.g.
--bf16 true --gradient_checkpointing true --save_total_limit 3 --warmup_ratio 0.01 --lr_scheduler_type cosine.

examples:
  python -m launch.pretrain_hf --model ./llama --data domain.jsonl --output-dir runs/pt --block-size 2048 --smoke
  torchrun --nproc_per_node 8 -m launch.pretrain_hf --model ./llama --data domain.jsonl general.jsonl \\
      --eval-data dev.jsonl --output-dir runs/pt --deepspeed zero3 --bf16 true --gradient_checkpointing true
  python -m launch.pretrain_hf --config ./tiny/config.json --tokenizer ./tiny --data d.jsonl --output-dir runs/scratch
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line; unknown ``--snake_case`` options go to ``TrainingArguments``."""
    from launch.sft import add_training_flags

    p = argparse.ArgumentParser(
        prog="python -m launch.pretrain_hf",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("model and data")
    start = io.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="pretrained checkpoint directory (Hugging Face, a converter's output, or "
                       "model_type workbench)")
    start.add_argument("--config", help="config.json (or a directory holding one): train from scratch")
    io.add_argument("--tokenizer", help="tokenizer directory (default: --model, or --config's directory)")
    io.add_argument("--data", required=True, nargs="+", help="training JSONL file(s), concatenated in this order")
    io.add_argument("--eval-data", nargs="+", help="evaluation JSONL file(s); enables evaluation every --eval-steps")
    io.add_argument("--output-dir", required=True, help="checkpoints, TensorBoard events (runs/) and the final model")
    io.add_argument("--block-size", type=int, default=2048,
                    help="tokens per block (default: 2048); the incomplete last block is dropped and counted")
    io.add_argument("--text-field", default="text", help="per-line field holding the text (default: text)")
    io.add_argument("--eos-token", help="end-of-text token to append when the tokenizer has none (it must be in "
                    "the vocabulary, e.g. '</s>' or '<|endoftext|>')")
    io.add_argument("--add-special-tokens", action="store_true",
                    help="let the tokenizer add its special tokens (e.g. BOS) to each text (default: text + EOS only)")
    io.add_argument("--preprocessing-num-workers", type=int, default=None,
                    help="processes for tokenization (datasets.map num_proc; default: one)")
    io.add_argument("--cache-dir", help="datasets cache for the tokenized data (default: HF_DATASETS_CACHE)")
    io.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                    help="dtype the weights are loaded in (default: float32; use --bf16 true for mixed precision)")
    io.add_argument("--attn-implementation", default="sdpa", help="sdpa (default), eager or flash_attention_2")

    ch = p.add_argument_group("channel loss")
    ch.add_argument("--channel-loss", default="auto", choices=["auto", "on", "off"],
                    help="per-channel loss curves; auto: on when the data names channels (default)")
    ch.add_argument("--channel-field", default="channel", help="per-line field naming its channel (default: channel)")

    add_training_flags(p, lr=1e-4, epochs=1.0, unit="blocks")

    sm = p.add_argument_group("smoke run (try small before the full run)")
    sm.add_argument("--smoke", action="store_true", help="the whole pipeline on the first --smoke-texts texts of "
                    "each file for --smoke-steps steps, into OUTPUT_DIR/smoke (never resumed, nothing saved), then "
                    "a one-screen report: tokens and loss per channel, step time, a full-run estimate")
    sm.add_argument("--smoke-texts", type=int, default=500, help="texts read per file in a smoke run (default: 500)")
    sm.add_argument("--smoke-steps", type=int, default=4, help="optimizer steps of a smoke run (default: 4)")
    return p


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load_config(args):
    from transformers import AutoConfig

    source = args.config or args.model
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        flag = "--config" if args.config else "--model"
        raise ValueError(f"{flag} {source!r}: no loadable config ({str(e).splitlines()[0]}); pass a Hugging Face "
                         "model directory or a config.json") from None


def _load_tokenizer(args):
    from transformers import AutoTokenizer

    source = args.tokenizer or args.model
    if source is None:
        source = args.config if os.path.isdir(args.config) else os.path.dirname(os.path.abspath(args.config))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"no tokenizer loads from {source!r} ({str(e).splitlines()[0]}); pass --tokenizer DIR") \
            from None
    if args.eos_token:
        if tokenizer.convert_tokens_to_ids(args.eos_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"--eos-token {args.eos_token!r} is not a token of the tokenizer in {source!r}; pass one "
                             "of its vocabulary (see its special_tokens_map.json)")
        tokenizer.eos_token = args.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {source!r} has no EOS token, so texts cannot be separated in a block; "
                         "pass --eos-token TOKEN with a token of its vocabulary (e.g. '</s>' or '<|endoftext|>')")
    return tokenizer


def check_model_fits(config, tokenizer, block_size: int) -> None:
    """Refuse, before any tokenization, a block the model cannot position or token ids it cannot embed."""
    if block_size < 2:
        raise ValueError(f"--block-size {block_size} leaves nothing to predict; use at least 2 (typically 2048)")
    positions = _max_positions(config)
    if positions is not None and block_size > positions:
        raise ValueError(f"--block-size {block_size} is above the model's {positions} positions "
                         f"(max_position_embeddings); pass --block-size {positions} or less")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}; pass the "
                         "model's own tokenizer (--tokenizer) or a config with vocab_size >= the tokenizer's")


def _register_workbench() -> None:
    """Our own model_type ``workbench`` registers with the Auto classes on import; older trees lack it."""
    try:
        import checkpoint_tools.modeling_workbench  # noqa: F401
    except ImportError:
        pass


def _parameter_count(model) -> int:
    # Under ZeRO-3 parameters are partitioned at construction; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _smoke_args(args, passthrough):
    smoke = copy.copy(args)
    smoke.output_dir = os.path.join(args.output_dir, "smoke")
    smoke.max_steps = args.smoke_steps
    smoke.logging_steps = 1
    smoke.eval_steps = args.smoke_steps
    smoke.no_resume = True
    return smoke, passthrough + ["--save_strategy", "no"]


def _step_timer():
    """A ``TrainerCallback`` recording every optimizer step's wall time (built here so ``--help`` imports no
    transformers)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def smoke_report(history, times, tokens_per_step, reports, slice_tokens, block_size, global_batch) -> str:
    """One screen: per channel tokens and first/last loss, step time, throughput and a full-run estimate."""
    channels = sorted({k.split("/", 1)[1] for h in history for k in h if k.startswith("channel_loss/")})
    first, last, tokens = {}, {}, {}
    for h in history:
        for name in channels:
            if f"channel_loss/{name}" in h:
                first.setdefault(name, (h["step"], h[f"channel_loss/{name}"]))
                last[name] = (h["step"], h[f"channel_loss/{name}"])
                tokens[name] = tokens.get(name, 0) + h.get(f"channel_tokens/{name}", 0)
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    lines = ["", "=" * 72, "smoke run report", "-" * 72]
    if channels:
        lines.append(f"{'channel':<20}{'tokens trained':>16}{'first loss':>16}{'last loss':>16}")
        for name in channels:
            lines.append(f"{name:<20}{int(tokens[name]):>16}{first[name][1]:>10.4f} @{first[name][0]:<4}"
                         f"{last[name][1]:>10.4f} @{last[name][0]:<4}")
    if losses:
        lines.append(f"loss (all tokens): {losses[0][1]:.4f} at step {losses[0][0]} -> {losses[-1][1]:.4f} at step "
                     f"{losses[-1][0]}")
    steady = times[1:] or times
    if steady:
        step = sum(steady) / len(steady)
        lines.append(f"step time: {step:.3f} s (mean of {len(steady)} steps after the first, which took "
                     f"{times[0]:.3f} s); {tokens_per_step / step:,.0f} tokens/s")
        total_bytes = sum(r.num_bytes for r in reports)
        if any(r.truncated for r in reports):
            # Bytes per token of the slice, scaled to the files' sizes: good to a few percent on uniform data.
            full_tokens = slice_tokens * total_bytes / max(1, sum(r.slice_bytes for r in reports))
            how = "estimated from the slice's bytes per token"
        else:
            full_tokens, how = slice_tokens, "the whole data"
        steps = full_tokens / (block_size * global_batch)
        lines.append(f"full run: ~{full_tokens:,.0f} tokens ({how}) = ~{steps:,.0f} steps per epoch at "
                     f"{global_batch} block{'s' * (global_batch != 1)} of {block_size} per step, "
                     f"~{steps * step / 3600:.2f} h per epoch")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, pretrain, save the final model into ``--output-dir``; returns the exit code."""
    from launch.sft import _split_passthrough, training_arguments

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    passthrough = _split_passthrough(unknown)
    if args.smoke:
        args, passthrough = _smoke_args(args, passthrough)

    # Bad input first, cheapest first: options, config, tokenizer, then every data line; training starts after.
    targs = training_arguments(args, passthrough, has_eval=bool(args.eval_data))
    is_main = targs.process_index == 0
    _register_workbench()
    config = _load_config(args)
    tokenizer = _load_tokenizer(args)
    check_model_fits(config, tokenizer, args.block_size)

    from launch.pretrain_hf_data import PackedBlocks, collate_blocks, scan_jsonl, tokenize_texts
    from patches.channel_loss import ChannelIndex

    limit = args.smoke_texts if args.smoke else None
    scan = dict(text_field=args.text_field, channel_field=args.channel_field, limit=limit)
    train_reports = [scan_jsonl(path, **scan) for path in args.data]
    eval_reports = [scan_jsonl(path, **scan) for path in args.eval_data or []]
    names = {n for r in train_reports + eval_reports for n in r.channels}
    has_channels = any(r.named_channels for r in train_reports + eval_reports)
    index = ChannelIndex(names)
    channel_loss = args.channel_loss == "on" or (args.channel_loss == "auto" and has_channels)

    tok = dict(text_field=args.text_field, channel_field=args.channel_field, num_proc=args.preprocessing_num_workers,
               cache_dir=args.cache_dir, add_special_tokens=args.add_special_tokens)
    # Rank 0 tokenizes and fills the cache; the other ranks then read the cache instead of tokenizing again.
    with targs.main_process_first(desc="tokenizing"):
        train_tok = tokenize_texts(train_reports, tokenizer, index, **tok)
        eval_tok = tokenize_texts(eval_reports, tokenizer, index, **tok) if eval_reports else None
    train_ds = PackedBlocks(train_tok, args.block_size)
    eval_ds = PackedBlocks(eval_tok, args.block_size) if eval_tok is not None else None
    for name, ds, reports in (("train", train_ds, train_reports), ("eval", eval_ds, eval_reports)):
        if ds is not None and len(ds) == 0:
            raise ValueError(f"{name} data {[r.path for r in reports]} holds {ds.num_tokens} tokens, less than one "
                             f"block of --block-size {args.block_size}; lower --block-size or add text")
    if is_main:
        for report in train_reports + eval_reports:
            print("\n".join(report.lines()), flush=True)
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is None:
                continue
            counts = ", ".join(f"{k} {v}" for k, v in ds.channel_token_counts(index).items())
            print(f"{name}: {ds.num_tokens} tokens -> {len(ds)} blocks of {args.block_size}; {ds.dropped_tokens} "
                  f"tokens of the incomplete last block dropped; tokens per channel: {counts}", flush=True)
        print(f"channel loss: {'on' if channel_loss else 'off'}; channels {list(index.names)}", flush=True)

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import get_last_checkpoint

    from patches.hf_trainer_channel_loss import ChannelLossTrainer, use_channel_tensorboard

    dtype = "auto" if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    if args.config:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn_implementation)
        how = f"from scratch ({config.model_type} config {args.config})"
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                     attn_implementation=args.attn_implementation)
        how = f"from {args.model} ({config.model_type})"
    if is_main:
        print(f"model: {_parameter_count(model):,} parameters, {how}", flush=True)

    timer = _step_timer()
    trainer = ChannelLossTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        channel_index=index if channel_loss else None,
        callbacks=[timer],
    )
    use_channel_tensorboard(trainer, index.names if channel_loss else ())

    resume = None
    if not args.no_resume and os.path.isdir(args.output_dir):
        resume = get_last_checkpoint(args.output_dir)
        if resume and is_main:
            print(f"resuming from {resume}", flush=True)
    stop = exit_signal.trainer_callback(args)
    trainer.add_callback(stop)
    trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:  # checkpoint-N is saved; the requeued run resumes there and saves the model
        return 0
    if args.smoke:
        if eval_ds is not None:
            trainer.evaluate()
        if is_main:
            global_batch = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
            for r in train_reports:
                r.slice_bytes = _bytes_of_first_texts(r.path, r.num_texts + r.num_empty) if r.truncated else r.num_bytes
            print(smoke_report(trainer.state.log_history, timer.times, global_batch * args.block_size,
                               train_reports, train_ds.num_tokens, args.block_size, global_batch), flush=True)
        return 0
    trainer.save_model(args.output_dir)
    if is_main:
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "pretrain_args.json"), "w") as f:
            json.dump({**vars(args), "passthrough": passthrough}, f, indent=2)
    return 0


def _bytes_of_first_texts(path: str, count: int) -> int:
    """Bytes of the lines holding the first ``count`` texts (blank lines included), for the full-run estimate."""
    seen = size = 0
    with open(path, "rb") as f:
        for line in f:
            size += len(line)
            seen += bool(line.strip())
            if seen >= count:
                break
    return size


if __name__ == "__main__":
    from launch.sft import run_entry_point

    run_entry_point(main)
