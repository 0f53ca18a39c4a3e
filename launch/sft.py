"""Supervised fine-tuning on the Hugging Face Trainer, with one loss curve per data channel.

Run as ``python -m launch.sft ...`` or ``torchrun --nproc_per_node N -m launch.sft ...``. Data: JSONL with chat
``messages``, ShareGPT ``conversations`` or Alpaca records, each with an optional ``channel``. Labels cover assistant
turns only; packing, LoRA (peft), DeepSpeed ZeRO-2/3 and resuming from the last checkpoint are options. See ``--help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from launch import exit_signal

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEEPSPEED_PRESETS = {"zero2": CONFIG_DIR / "ds_zero2.json", "zero3": CONFIG_DIR / "ds_zero3.json"}

EPILOG = """\
data formats (one JSON object per line, optional "channel": "<name>" on any of them):
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
  {"instruction": "...", "input": "...", "output": "..."}

channel loss: with --channel-loss auto (default) it is on when any sample names a channel. Each logging window
logs channel_loss/<name> (token mean over the window, all ranks) and channel_tokens/<name>; evaluation logs
eval_channel_loss/<name>. Render the curves: python -m launch.plot_channel_loss OUTPUT_DIR --out curves.png

Any other transformers.TrainingArguments field can be given in its own spelling and is passed through,
e.g. --warmup_ratio 0.03 --lr_scheduler_type cosine --bf16 true --gradient_checkpointing true.

examples:
  python -m launch.sft --model ./llama --data train.jsonl --output-dir runs/sft --packing
  torchrun --nproc_per_node 8 -m launch.sft --model ./llama --data train.jsonl --eval-data dev.jsonl \\
      --output-dir runs/sft --lora --deepspeed zero2 --bf16 true
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line; unknown ``--snake_case`` options go to ``TrainingArguments``."""
    p = argparse.ArgumentParser(
        prog="python -m launch.sft",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("model and data")
    io.add_argument("--model", required=True, help="Hugging Face model directory (or hub id when online)")
    io.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    io.add_argument("--data", required=True, nargs="+", help="training JSONL file(s)")
    io.add_argument("--eval-data", nargs="+", help="evaluation JSONL file(s); enables evaluation every --eval-steps")
    io.add_argument("--output-dir", required=True, help="checkpoints, TensorBoard events (runs/) and the final model")
    io.add_argument("--max-length", type=int, default=2048, help="tokens per sample (longer ones are truncated and "
                    "counted) and per packed row (default: 2048)")
    io.add_argument("--packing", action="store_true", help="pack several samples per row; attention never crosses "
                    "a sample boundary")
    io.add_argument("--chat-template", help="a Jinja chat template file replacing the tokenizer's (default: the "
                    "tokenizer's own, ChatML when it has none)")
    io.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                    help="dtype the weights are loaded in (default: float32; use --bf16 true for mixed precision)")
    io.add_argument("--attn-implementation", default="sdpa", help="sdpa (default), eager or flash_attention_2")

    ch = p.add_argument_group("channel loss")
    ch.add_argument("--channel-loss", default="auto", choices=["auto", "on", "off"],
                    help="per-channel loss curves; auto: on when the data names channels (default)")
    ch.add_argument("--channel-field", default="channel", help="per-sample field naming its channel (default: channel)")
    ch.add_argument("--channel-loss-mode", default="token", choices=["token", "sample"],
                    help="token: token mean per channel, like Megatron (default); sample: mean of per-sample means")

    lo = p.add_argument_group("LoRA (needs peft: pip install 'megatron-workbench[sft]')")
    lo.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    lo.add_argument("--lora-r", type=int, default=16, help="adapter rank (default: 16)")
    lo.add_argument("--lora-alpha", type=int, default=32, help="adapter scaling alpha (default: 32)")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="adapter dropout (default: 0.05)")
    lo.add_argument("--lora-target-modules", default="all-linear",
                    help="comma-separated module names, or all-linear (default)")

    add_training_flags(p, lr=2e-5, epochs=3.0, unit="rows")
    return p


def add_training_flags(p: argparse.ArgumentParser, *, lr: float, epochs: float, unit: str) -> None:
    """The Trainer flags SFT and post-pretraining share; `unit` names what a batch holds ("rows", "blocks")."""
    tr = p.add_argument_group("training")
    tr.add_argument("--deepspeed", help=f"DeepSpeed config JSON, or one of {sorted(DEEPSPEED_PRESETS)} for "
                    "launch/configs/ds_<name>.json (needs deepspeed: pip install 'megatron-workbench[deepspeed]')")
    tr.add_argument("--no-resume", action="store_true", help="start fresh even if --output-dir has checkpoints "
                    "(default: resume from the last checkpoint-N there)")
    tr.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    tr.add_argument("--epochs", type=float, default=epochs, help=f"training epochs (default: {epochs:g})")
    tr.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    tr.add_argument("--batch-size", type=int, default=1, help=f"{unit} per device per micro-batch (default: 1)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    tr.add_argument("--logging-steps", type=int, default=10, help="optimizer steps per logging window (default: 10)")
    tr.add_argument("--save-steps", type=int, default=500, help="optimizer steps between checkpoints (default: 500)")
    tr.add_argument("--eval-steps", type=int, help="optimizer steps between evaluations (default: --save-steps)")
    tr.add_argument("--no-shuffle", action="store_true", help=f"read {unit} in file order instead of shuffling")
    tr.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    tr.add_argument("--report-to", default="tensorboard", help="Trainer loggers, comma-separated (default: "
                    "tensorboard; 'none' for none)")
    exit_signal.add_flags(tr)


def _split_passthrough(unknown: list[str]) -> list[str]:
    """Keep only ``--snake_case`` TrainingArguments options; anything else is a typo worth an error."""
    for token in unknown:
        if token.startswith("--") and "-" in token[2:].split("=")[0]:
            raise SystemExit(
                f"error: unknown option {token}; see --help (TrainingArguments fields are spelled with underscores)"
            )
    return unknown


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def training_arguments(args: argparse.Namespace, passthrough: list[str], has_eval: bool):
    """``TrainingArguments`` from our options, then pass-through options (which win), parsed by HfArgumentParser."""
    from transformers import HfArgumentParser, TrainingArguments

    deepspeed = args.deepspeed
    if deepspeed is not None:
        deepspeed = str(DEEPSPEED_PRESETS.get(deepspeed, deepspeed))
        if not os.path.isfile(deepspeed):
            raise ValueError(f"--deepspeed {args.deepspeed!r} is neither a file nor one of {sorted(DEEPSPEED_PRESETS)}")
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise ValueError(
                "--deepspeed needs the deepspeed package, which is not installed; "
                "pip install 'megatron-workbench[deepspeed]' (or drop --deepspeed)"
            ) from None
    hf = [
        "--output_dir", args.output_dir,
        "--learning_rate", str(args.lr),
        "--num_train_epochs", str(args.epochs),
        "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(args.grad_accum),
        "--logging_strategy", "steps",
        "--logging_steps", str(args.logging_steps),
        "--save_strategy", "steps",
        "--save_steps", str(args.save_steps),
        "--seed", str(args.seed),
        "--report_to", *args.report_to.split(","),
        "--train_sampling_strategy", "sequential" if args.no_shuffle else "random",
        # Our collator needs the channel fields that the column filter would remove; eval keeps only the loss.
        "--remove_unused_columns", "false",
        "--prediction_loss_only", "true",
        # Every parameter that requires grad takes part in a decoder's forward; searching for unused ones costs a
        # graph traversal per step.
        "--ddp_find_unused_parameters", "false",
    ]
    if has_eval:
        hf += ["--eval_strategy", "steps", "--eval_steps", str(args.eval_steps or args.save_steps)]
    if deepspeed:
        hf += ["--deepspeed", deepspeed]
    if not _has_accelerator():
        # accelerate sets up multi-process CPU training (gloo) only when told it runs on the CPU; without this,
        # torchrun on a CPU-only machine starts N independent trainers that each see all the data.
        hf += ["--use_cpu", "true"]
    (targs,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=hf + passthrough)
    if deepspeed:
        _join_deepspeed_comm(targs)
    return targs


def _join_deepspeed_comm(targs) -> None:
    """Make deepspeed.comm see the process group torch already has.

    ZeRO-3 builds the model partitioned (``deepspeed.zero.Init`` inside ``from_pretrained``) and reads the world size
    from ``deepspeed.comm``; accelerate's CPU path sets up ``torch.distributed`` (gloo) but not ``deepspeed.comm``, so
    ZeRO-3 would see a world of 1 and refuse the batch sizes.
    """
    import deepspeed
    import torch.distributed as dist

    _ = targs.world_size  # sets up torch.distributed (gloo on CPU, the accelerator's backend elsewhere)
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _load_datasets(args, tokenizer, is_main: bool):
    """Read, tokenize and report every file; returns (train samples, eval samples or None, reports)."""
    from launch.sft_data import load_jsonl, tokenize_dataset

    def read(paths):
        samples, reports, any_channel = [], [], False
        for path in paths:
            conversations = load_jsonl(path, args.channel_field)
            any_channel |= any(c.channel is not None for c in conversations)
            tokenized, report = tokenize_dataset(tokenizer, conversations, args.max_length, path)
            samples += tokenized
            reports.append(report)
        return samples, reports, any_channel

    train, reports, has_channels = read(args.data)
    evals = None
    if args.eval_data:
        evals, eval_reports, eval_channels = read(args.eval_data)
        reports += eval_reports
        has_channels |= eval_channels
    if is_main:
        for report in reports:
            print("\n".join(report.lines()), flush=True)
    return train, evals, has_channels


def _apply_lora(model, args):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora needs peft, which is not installed; pip install 'megatron-workbench[sft]'") from None
    targets = args.lora_target_modules
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
    )
    return get_peft_model(model, config)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, save the final model into ``--output-dir``; returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    passthrough = _split_passthrough(unknown)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from launch.sft_data import ensure_chat_template
    from launch.sft_packing import SFTCollator, SFTDataset
    from patches.channel_loss import build_index
    from patches.hf_trainer_channel_loss import ChannelLossTrainer, use_channel_tensorboard

    targs = training_arguments(args, passthrough, has_eval=bool(args.eval_data))
    if args.packing and targs.use_cache:
        raise ValueError(
            "--use_cache true with --packing: transformers only derives per-sample attention masks from position_ids "
            "when no KV cache is built, so attention would cross packed sample boundaries; drop --use_cache"
        )
    is_main = targs.process_index == 0

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.chat_template:
        if not os.path.isfile(args.chat_template):
            raise ValueError(f"--chat-template {args.chat_template!r} is not a file; pass a Jinja template file")
        tokenizer.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    elif ensure_chat_template(tokenizer) and is_main:
        print("tokenizer has no chat template: using ChatML", flush=True)
    if tokenizer.pad_token_id is None:
        # Padded positions are neither attended to nor learned, so any id will do; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token")

    train_samples, eval_samples, has_channels = _load_datasets(args, tokenizer, is_main)
    channel_loss = args.channel_loss == "on" or (args.channel_loss == "auto" and has_channels)
    index = build_index([s.channel for s in train_samples + (eval_samples or [])])
    train_ds = SFTDataset(train_samples, index, args.max_length, args.packing)
    eval_ds = SFTDataset(eval_samples, index, args.max_length, args.packing) if eval_samples else None
    if is_main:
        if args.packing:
            tokens = sum(len(s.input_ids) for s in train_samples)
            print(f"packing: {len(train_samples)} samples into {len(train_ds)} rows of up to {args.max_length} "
                  f"tokens ({tokens / (len(train_ds) * args.max_length):.1%} full)", flush=True)
        print(f"channel loss: {'on' if channel_loss else 'off'}; channels {list(index.names)}", flush=True)

    dtype = "auto" if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation)
    if args.lora:
        if targs.gradient_checkpointing:
            # With frozen embeddings nothing upstream of the first checkpointed layer requires grad, and reentrant
            # checkpointing would then drop the adapters' gradients.
            model.enable_input_require_grads()
        model = _apply_lora(model, args)
        if is_main:
            model.print_trainable_parameters()

    trainer = ChannelLossTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SFTCollator(tokenizer.pad_token_id, packing=args.packing),
        processing_class=tokenizer,
        channel_index=index if channel_loss else None,
        channel_loss_mode=args.channel_loss_mode,
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
    trainer.save_model(args.output_dir)
    if is_main:
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "sft_args.json"), "w") as f:
            json.dump({**vars(args), "passthrough": passthrough}, f, indent=2)
    return 0


def run_entry_point(main) -> None:
    """Run a Trainer script's ``main`` and exit: bad input as one line, and the process group closed on the way out.

    Every rank waits for the others and destroys the gloo/NCCL group before the interpreter exits; a rank that exits
    with the group still open can abort in gloo's C++ teardown ("terminate called without an active exception") and
    torchrun then reports a run that finished as failed.
    """
    try:
        code = main()
    except ValueError as e:
        # Bad input is the user's to fix: one readable line (per rank under torchrun), not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    run_entry_point(main)
