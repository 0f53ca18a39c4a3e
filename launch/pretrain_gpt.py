"""Train a GPT model on megatron-core with per-channel loss: ``torchrun --nproc_per_node N -m launch.pretrain_gpt``.

The pip package ``megatron-core`` has no ``megatron.training``, so this is the loop, built from core's own pieces:
``GPTModel`` (local layer spec; Transformer Engine's when installed), ``DistributedDataParallel``,
``get_megatron_optimizer``, ``OptimizerParamScheduler``, ``get_forward_backward_func`` (1F1B, interleaved with
virtual stages), the num-microbatches calculator and ``megatron.core.datasets``. Flags are spelled as Megatron-LM
spells them, so a launch script ports with few edits; DP is the world size over TP x PP. On one process it runs
without torchrun; on a machine without CUDA it runs through ``megatron_bridge.cpu_runtime`` on gloo.

Every check that can fail on user input (flags against the checkpoint's args, the parallel layout against the model,
data files, channels) runs before the process group starts, so bad input costs one clear line and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from launch import exit_signal, mcore_checkpoint, mcore_data
from patches.channel_loss import ChannelIndex, check_same_index_across_ranks
from patches.megatron_channel_loss import MegatronChannelLoss, channel_loss_func

# Model-shape flags: (flag dest, what it means). With --load they must agree with the checkpoint's args.
SHAPE_FLAGS = {
    "num_layers": "transformer layers",
    "hidden_size": "hidden size",
    "ffn_hidden_size": "MLP hidden size",
    "num_attention_heads": "attention heads",
    "num_query_groups": "KV groups (GQA)",
    "kv_channels": "head dim",
    "max_position_embeddings": "positions the model was built for",
    "norm_epsilon": "RMSNorm epsilon",
    "rotary_base": "rope theta",
    "vocab_size": "true vocab size",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.pretrain_gpt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("parallelism (DP = world size / (TP x PP))")
    g.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per virtual pipeline chunk: turns on the interleaved 1F1B schedule")
    g.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", type=int,
                   help="virtual pipeline chunks per pipeline rank (alternative to the flag above)")

    g = p.add_argument_group("model (from --load's args; shape flags only for a run from scratch or as a check)")
    g.add_argument("--load", help="checkpoint to start from (a converted one, or a previous run's to resume)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="accepted for Megatron-LM scripts; the shape always comes from --load's args")
    g.add_argument("--no-load-optim", action="store_true", help="do not restore optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG state")
    g.add_argument("--finetune", action="store_true",
                   help="start at iteration 0 with fresh optimizer state (weights from --load)")
    g.add_argument("--allow-global", action="append", default=[], metavar="MODULE.NAME",
                   help="trust one more pickled global in --load's files (repeatable)")
    g.add_argument("--num-layers", type=int, help=SHAPE_FLAGS["num_layers"])
    g.add_argument("--hidden-size", type=int, help=SHAPE_FLAGS["hidden_size"])
    g.add_argument("--ffn-hidden-size", type=int, help="MLP hidden size (default 4 x hidden)")
    g.add_argument("--num-attention-heads", type=int, help=SHAPE_FLAGS["num_attention_heads"])
    g.add_argument("--num-query-groups", type=int, help="KV groups (default: one per head)")
    g.add_argument("--group-query-attention", action="store_true", help="accepted; implied by --num-query-groups")
    g.add_argument("--kv-channels", type=int, help="head dim (default hidden / heads)")
    g.add_argument("--max-position-embeddings", type=int, help="positions the model is built for")
    g.add_argument("--norm-epsilon", type=float, help="RMSNorm epsilon (default 1e-5)")
    g.add_argument("--rotary-base", type=float, help="rope theta (default 10000)")
    g.add_argument("--vocab-size", type=int, help="true vocab size (padded for TP as Megatron-LM does)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocab padding multiple (x TP)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="scratch runs: a separate output layer")
    g.add_argument("--init-method-std", type=float, default=0.02, help="scratch runs: weight init std")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch per DP rank")
    g.add_argument("--global-batch-size", type=int, help="sequences per step (default micro x DP)")
    g.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    g.add_argument("--train-iters", type=int, default=0, help="optimizer steps to reach (counts resumed ones)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=int, help="decay steps (default --train-iters)")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root"], help="learning-rate decay")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters with fp32 master weights")
    g.add_argument("--seed", type=int, default=1234, help="random seed (data order, init)")

    g = p.add_argument_group("data (every source carries channels)")
    g.add_argument("--data-path", nargs="+", help="indexed datasets: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...; "
                                                   "each blend component is a channel")
    g.add_argument("--split", default="969,30,1", help="train,valid,test split of --data-path")
    g.add_argument("--data-cache-path", help="where megatron-core caches dataset indices (default beside the data)")
    g.add_argument("--sft-data", help="SFT JSONL: messages / text / input_ids(+loss_mask), optional 'channel'")
    g.add_argument("--sft-eval-data", help="SFT JSONL evaluated every --eval-interval")
    g.add_argument("--packing", action="store_true", help="SFT: several samples per sequence, attention kept apart")
    g.add_argument("--tokenizer-model", help="tokenizer folder for text/chat SFT records (default: --load's)")
    g.add_argument("--channel-names", nargs="+", help="names of the --data-path components, in order (space or "
                                                      "comma separated), or the declared channel set of --sft-data")
    g.add_argument("--channel-field", default="channel", help="the JSONL field that names a sample's channel")
    g.add_argument("--no-channel-loss", action="store_true", help="turn the per-channel accounting off")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="where to write checkpoints (Megatron-LM layout)")
    g.add_argument("--save-interval", type=int, help="save every N steps (and at the end)")
    g.add_argument("--exit-interval", type=int,
                   help="stop (and save) after a step divisible by N, keeping --train-iters' schedule")
    g.add_argument("--ckpt-format", choices=mcore_checkpoint.FORMATS, default="torch",
                   help="torch: legacy mp_rank_* files; torch_dist: megatron.core.dist_checkpointing")
    exit_signal.add_flags(g)

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="steps per logging window")
    g.add_argument("--tensorboard-dir", help="TensorBoard event files (written by the last rank)")
    g.add_argument("--eval-interval", type=int, default=1000, help="evaluate every N steps")
    g.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation")
    g.add_argument("--eval-only", action="store_true",
                   help="score --load on every sample of --sft-data / --data-path exactly once, then exit")
    g.add_argument("--eval-output", help="--eval-only: also write the per-channel table as JSON here")
    g.add_argument("--dump-batches", help="write every micro-batch the loss saw (ids, mask, channels) under this "
                                          "folder, for audits and exact re-computation")
    return p


# ======================================================================= plan: every check before any process group

@dataclass
class Plan:
    """What the run will do, resolved and checked on every rank before the process group starts."""

    args: argparse.Namespace          # the flags
    model_args: argparse.Namespace    # Megatron-LM args describing the model at this run's layout
    world: int
    dp: int
    vpp: int
    num_microbatches: int
    iteration: int = 0
    channels: Optional[ChannelIndex] = None
    component_channels: list = field(default_factory=list)
    train_samples: Optional[list] = None
    eval_samples: Optional[list] = None
    load_format: Optional[str] = None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fail(message: str):
    raise ValueError(message)


def model_args_from_flags(a: argparse.Namespace, tp: int, pp: int, vpp: int) -> argparse.Namespace:
    """Megatron-LM args for a model trained from scratch, through the same table the converters use."""
    from checkpoint_tools.canonical import CanonicalConfig
    from megatron_bridge.megatron_args import args_from_canonical

    missing = [f"--{k.replace('_', '-')}" for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                                    "max_position_embeddings") if getattr(a, k) is None]
    if missing:
        _fail(f"no --load checkpoint, so the model is built from flags, and {missing} are missing; give them or "
              "--load a converted checkpoint")
    heads = a.num_attention_heads
    cfg = CanonicalConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.ffn_hidden_size or 4 * a.hidden_size,
        num_layers=a.num_layers, num_attention_heads=heads, num_key_value_heads=a.num_query_groups or heads,
        head_dim=a.kv_channels or a.hidden_size // heads, max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=a.norm_epsilon or 1e-5, rope_theta=a.rotary_base or 10000.0,
        tie_word_embeddings=not a.untie_embeddings_and_output_weights,
        dtype="bfloat16" if a.bf16 else "float32")
    cfg.validate()
    return args_from_canonical(cfg, tp=tp, pp=pp, vpp=vpp, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                               seq_length=a.seq_length)


def _check_flags_against_checkpoint(a: argparse.Namespace, ckpt: argparse.Namespace, root: str) -> None:
    """Shape flags given together with --load must say what the checkpoint says (Megatron-LM's rule)."""
    from megatron_bridge.megatron_args import rms_norm_eps_from_args

    ng = ckpt.num_query_groups if getattr(ckpt, "group_query_attention", False) else ckpt.num_attention_heads
    # The epsilon under whichever name the writer used (Megatron-LM 0.16 stores --norm-epsilon as layernorm_epsilon).
    saved = {**{k: getattr(ckpt, k, None) for k in SHAPE_FLAGS}, "num_query_groups": ng,
             "norm_epsilon": rms_norm_eps_from_args(ckpt)}
    if saved["kv_channels"] is None:
        saved["kv_channels"] = ckpt.hidden_size // ckpt.num_attention_heads
    wrong = []
    for key in SHAPE_FLAGS:
        given = getattr(a, key)
        if given is not None and saved[key] is not None and float(given) != float(saved[key]):
            wrong.append(f"--{key.replace('_', '-')} {given} (checkpoint: {saved[key]})")
    if a.untie_embeddings_and_output_weights and not getattr(ckpt, "untie_embeddings_and_output_weights", False):
        wrong.append("--untie-embeddings-and-output-weights (checkpoint: tied)")
    if wrong:
        _fail(f"flags disagree with the args of --load {root}: {', '.join(wrong)}; drop them (the shape comes from "
              "the checkpoint) or load another checkpoint")


def _at_layout(ckpt: argparse.Namespace, tp: int, pp: int, vpp: int, root: str, fmt: str) -> argparse.Namespace:
    from megatron_bridge.megatron_args import parallel_sizes

    stp, spp, svpp = parallel_sizes(ckpt)
    if fmt == "torch" and (stp, spp, svpp) != (tp, pp, vpp):
        _fail(f"--load {root} is a legacy checkpoint saved at TP={stp} PP={spp} VPP={svpp}, and this run asks for "
              f"TP={tp} PP={pp} VPP={vpp}; reshard it first (python -m launch convert {root} NEW_DIR --tp {tp} --pp "
              f"{pp} --vpp {vpp}) or save it as torch_dist, which reshards at load")
    if ckpt.padded_vocab_size % tp:
        _fail(f"the checkpoint's padded vocab ({ckpt.padded_vocab_size}) is not divisible by TP={tp}; reshard with "
              f"python -m launch convert {root} NEW_DIR --tp {tp}")
    out = argparse.Namespace(**vars(ckpt))
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = tp, pp
    out.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    out.num_layers_per_virtual_pipeline_stage = ckpt.num_layers // (pp * vpp) if vpp > 1 else None
    return out


def _check_layout(m: argparse.Namespace, tp: int, pp: int, vpp: int, world: int) -> None:
    from megatron_bridge.layout import stage_layers
    from megatron_bridge.megatron_args import shape_from_args
    from megatron_bridge.param_kinds import check_tp

    check_tp(tp, shape_from_args(m, m.padded_vocab_size), m.ffn_hidden_size)
    if m.padded_vocab_size % tp:
        _fail(f"padded vocab {m.padded_vocab_size} is not divisible by TP={tp}")
    stage_layers(m.num_layers, pp, vpp)


def _vpp(a: argparse.Namespace, num_layers: int, pp: int) -> int:
    if a.num_layers_per_virtual_pipeline_stage and a.virtual_pipeline_model_parallel_size:
        _fail("give --num-layers-per-virtual-pipeline-stage or --virtual-pipeline-model-parallel-size, not both")
    if a.num_layers_per_virtual_pipeline_stage:
        per = a.num_layers_per_virtual_pipeline_stage
        if num_layers % (per * pp):
            _fail(f"--num-layers-per-virtual-pipeline-stage {per} x PP={pp} does not divide num_layers={num_layers}")
        return num_layers // (per * pp)
    return a.virtual_pipeline_model_parallel_size or 1


def _tokenizer(a: argparse.Namespace):
    """The tokenizer of --tokenizer-model, else the one --load carries (its hf_assets), else None."""
    from megatron_bridge import sidecar

    path = a.tokenizer_model or (sidecar.assets_dir(a.load) if a.load else None)
    if path is None:
        return None
    from transformers import AutoTokenizer

    from launch.sft_data import ensure_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise ValueError(f"cannot load a tokenizer from {path} ({type(e).__name__}); pass --tokenizer-model DIR") \
            from None
    ensure_chat_template(tok)
    return tok


def plan_run(a: argparse.Namespace) -> Plan:
    """Resolve the model, layout, batch arithmetic and data; raise ValueError on anything wrong."""
    world = _world_size()
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        _fail(f"--tp {tp} --pp {pp}: sizes must be at least 1")
    if world % (tp * pp):
        _fail(f"TP={tp} x PP={pp} = {tp * pp} does not divide the world size {world}; use --nproc_per_node a multiple "
              f"of {tp * pp} or other --tp/--pp")
    if (a.sft_data is None) == (a.data_path is None):
        _fail("give exactly one data source: --data-path PREFIX... (indexed) or --sft-data FILE.jsonl")
    iteration, fmt = 0, None
    if a.load:
        ckpt_args, iteration, fmt = mcore_checkpoint.read_args(a.load, a.allow_global)
        _check_flags_against_checkpoint(a, ckpt_args, a.load)
        vpp = _vpp(a, ckpt_args.num_layers, pp)
        model_args = _at_layout(ckpt_args, tp, pp, vpp, a.load, fmt)
        if a.finetune:
            iteration = 0
    else:
        if a.eval_only:
            _fail("--eval-only scores a checkpoint: give --load")
        if a.num_layers is None:
            model_args_from_flags(a, 1, 1, 1)  # names the missing flags
        vpp = _vpp(a, a.num_layers, pp)
        model_args = model_args_from_flags(a, tp, pp, vpp)
    _check_layout(model_args, tp, pp, vpp, world)
    if a.seq_length > model_args.max_position_embeddings:
        _fail(f"--seq-length {a.seq_length} is above the model's max_position_embeddings="
              f"{model_args.max_position_embeddings}; use at most that")
    dp = world // (tp * pp)
    gbs = a.global_batch_size or a.micro_batch_size * dp
    if gbs % (a.micro_batch_size * dp):
        _fail(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {a.micro_batch_size} x DP={dp}")
    num_micro = gbs // (a.micro_batch_size * dp)
    if vpp > 1 and (num_micro < pp or num_micro % pp):
        _fail(f"the interleaved schedule needs micro-batches per step ({num_micro} = global {gbs} / (micro "
              f"{a.micro_batch_size} x DP {dp})) to be a multiple of PP={pp}; raise --global-batch-size")
    if not a.eval_only and a.train_iters <= iteration:
        _fail(f"--train-iters {a.train_iters} is not past the checkpoint's iteration {iteration}; nothing to train")
    plan = Plan(a, model_args, world, dp, vpp, num_micro, iteration=iteration, load_format=fmt)
    plan.model_args.global_batch_size = gbs
    _plan_data(plan)
    return plan


def _declared(a: argparse.Namespace) -> Optional[list[str]]:
    if not a.channel_names:
        return None
    names = [n.strip() for item in a.channel_names for n in item.split(",")]
    if not all(names) or len(set(names)) != len(names):
        _fail(f"--channel-names {' '.join(a.channel_names)!r}: names must be non-empty and distinct")
    return names


def _plan_data(plan: Plan) -> None:
    a = plan.args
    declared = _declared(a)
    vocab = getattr(plan.model_args, "vocab_size", None) or plan.model_args.padded_vocab_size
    if a.data_path:
        prefixes, _ = mcore_data.parse_blend(a.data_path)
        for prefix in prefixes:
            mcore_data.check_indexed_dataset(prefix)
        names = declared or [os.path.basename(p) for p in prefixes]
        if len(names) != len(prefixes):
            _fail(f"--channel-names gives {len(names)} names for {len(prefixes)} --data-path components")
        if len(set(names)) != len(names):
            _fail(f"--data-path components share a file name ({names}); name the channels with --channel-names")
        plan.channels = ChannelIndex(names)
        plan.component_channels = [plan.channels.id(n) for n in names]
        if a.eval_only:
            plan.eval_samples = mcore_data.indexed_windows(prefixes, names, a.seq_length)
        return
    cache = []

    def tok():
        if not cache:
            cache.append(_tokenizer(a))
        return cache[0]

    plan.train_samples = mcore_data.read_sft_jsonl(a.sft_data, a.seq_length, tok, vocab, a.channel_field)
    if a.sft_eval_data:
        plan.eval_samples = mcore_data.read_sft_jsonl(a.sft_eval_data, a.seq_length, tok, vocab, a.channel_field)
    found = mcore_data.channel_names_of(plan.train_samples + (plan.eval_samples or []))
    plan.channels = ChannelIndex(declared or found)
    for samples in (plan.train_samples, plan.eval_samples or []):
        mcore_data.check_declared(samples, plan.channels)
    if a.eval_only:
        plan.eval_samples, plan.train_samples = plan.train_samples, None


# ============================================================================ the run

def init_distributed() -> None:
    """Join torchrun's process group, or make a one-process group when started without torchrun."""
    from megatron_bridge import cpu_runtime

    cpu_runtime.enable()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def _layer_spec(m: argparse.Namespace):
    """Transformer Engine's layer spec when it is installed, megatron-core's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    qk = getattr(m, "qk_layernorm", False)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)


def build_model_chunks(m: argparse.Namespace, initialize: bool, init_std: float) -> list:
    """This rank's ``GPTModel`` chunks (one per virtual stage), from the Megatron-LM args."""
    from megatron_bridge.model_builder import build_models, transformer_config

    config = transformer_config(m)
    config.perform_initialization = initialize
    config.init_method_std = init_std
    if initialize:  # TransformerConfig derived its init methods from the default std in __post_init__
        from megatron.core.utils import init_method_normal, scaled_init_method_normal

        config.init_method = init_method_normal(init_std)
        config.output_layer_init_method = scaled_init_method_normal(init_std, m.num_layers)
    return build_models(m, config=config, layer_spec=_layer_spec(m))


class Trainer:
    """The training loop's state and steps; ``launch.pretrain_gpt.main`` and the benchmark drive it."""

    def __init__(self, plan: Plan):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_bridge import cpu_runtime

        self.plan = plan
        a, m = plan.args, plan.model_args
        self.args = a
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=plan.vpp if plan.vpp > 1 else None)
        cpu_runtime.seed(a.seed)
        self.rank = dist.get_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.gbs = m.global_batch_size
        init_num_microbatches_calculator(self.rank, None, self.gbs, a.micro_batch_size, plan.dp)

        m.params_dtype = torch.bfloat16 if a.bf16 else torch.float32
        m.bf16 = a.bf16
        self.chunks = build_model_chunks(m, initialize=a.load is None, init_std=a.init_method_std)
        config = self.chunks[0].config
        if dist.get_backend() == "gloo":
            # gloo pairs sends and receives by posting order per peer. Batched p2p posts send_prev before send_next,
            # so at PP=2 (prev == next) the interleaved schedule's activations and gradients cross (same shapes:
            # wrong losses, no error). Unbatched p2p splits the two directions over two groups.
            config.batch_p2p_comm = False
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False, bucket_size=None)
        self.model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                              disable_bucketing=i > 0) for i, c in enumerate(self.chunks)]
        for chunk in self.model:  # scratch runs: one initialization for every DP replica
            chunk.broadcast_params()
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay, adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2, adam_eps=a.adam_eps, clip_grad=a.clip_grad, bf16=a.bf16,
            params_dtype=m.params_dtype, use_distributed_optimizer=False), self.model)
        decay = a.lr_decay_iters or max(a.train_iters, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if a.lr_warmup_iters else a.lr, max_lr=a.lr, min_lr=a.min_lr,
            lr_warmup_steps=a.lr_warmup_iters * self.gbs, lr_decay_steps=decay * self.gbs,
            lr_decay_style=a.lr_decay_style, start_wd=a.weight_decay, end_wd=a.weight_decay,
            wd_incr_steps=decay * self.gbs, wd_incr_style="constant")
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = [c.no_sync for c in self.model] if len(self.model) > 1 else self.model[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads

        self.iteration = plan.iteration
        self.resumed = False
        if a.load:
            self.resumed = mcore_checkpoint.load(a.load, self.chunks, self.optimizer, self.scheduler,
                                                 load_optim=not (a.no_load_optim or a.finetune),
                                                 load_rng=not (a.no_load_rng or a.finetune),
                                                 allow_globals=a.allow_global)
            if not self.resumed:
                # bf16 keeps fp32 master copies made when the optimizer was built: refresh them from the weights.
                self.optimizer.reload_model_params()
                self.iteration = 0 if a.finetune else plan.iteration
        self.consumed = self.iteration * self.gbs

        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        check_same_index_across_ranks(plan.channels)
        self.channel_loss = MegatronChannelLoss(plan.channels, enabled=not a.no_channel_loss)
        self.writer = None
        if a.tensorboard_dir and self.rank == dist.get_world_size() - 1:  # Megatron-LM's writer rank
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=a.tensorboard_dir, max_queue=1000)
        self.dump = None
        if a.dump_batches and self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
            self.dump = []
        self.packing = bool(a.packing)
        self._window_loss = torch.zeros(2, dtype=torch.float64)

    # ------------------------------------------------------------------ data
    def _reading_rank(self) -> bool:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank() == 0

    def iterators(self, dataset, consumed: int, once: bool = False):
        """One TP-broadcast iterator per model chunk, all over the same rows (the interleaved schedule calls each
        chunk's own iterator, as Megatron-LM's per-chunk data iterators)."""
        from megatron.core import parallel_state as ps

        a = self.args
        out = []
        for _ in self.model:
            source = None
            if self._reading_rank():
                indices = mcore_data.pretraining_indices(
                    len(dataset), consumed, a.micro_batch_size, ps.get_data_parallel_rank(), self.plan.dp,
                    once_in=self.gbs if once else None)
                source = mcore_data.batches(dataset, indices, a.seq_length)
            out.append(mcore_data.TPBroadcast(source, a.micro_batch_size, a.seq_length, self.packing))
        return out if len(out) > 1 else out[0]

    def build_datasets(self) -> None:
        """Train and validation rows on every rank (megatron-core's builder synchronizes ranks)."""
        from megatron.core import parallel_state as ps

        a, plan = self.args, self.plan
        self.train_rows = self.valid_rows = None
        if a.data_path and not a.eval_only:
            prefixes, weights = mcore_data.parse_blend(a.data_path)
            evals = (a.train_iters // a.eval_interval + 1) * a.eval_iters if a.eval_iters else 0
            sizes = [a.train_iters * self.gbs, evals * self.gbs, 0]
            train, valid = mcore_data.build_blend_datasets(
                prefixes, weights, a.split, a.seq_length, sizes, a.seed, plan.model_args.padded_vocab_size,
                a.data_cache_path, lambda: ps.get_tensor_model_parallel_rank() == 0)
            if train is not None:
                self.train_rows = mcore_data.BlendRows(train, plan.component_channels)
            if valid is not None:
                self.valid_rows = mcore_data.BlendRows(valid, plan.component_channels)
        else:
            if plan.train_samples is not None and not a.eval_only:
                self.train_rows = mcore_data.SampleRows(plan.train_samples, plan.channels, a.seq_length,
                                                        self.packing)
            if plan.eval_samples is not None:
                self.valid_rows = mcore_data.SampleRows(plan.eval_samples, plan.channels, a.seq_length, self.packing)
        # megatron-core builds datasets on the reading ranks only; every rank must agree on the row counts, since
        # they decide whether (and how long) the collective schedule runs.
        counts = torch.tensor([len(r) if r is not None else 0 for r in (self.train_rows, self.valid_rows)])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        self.train_count, self.valid_count = (int(c) for c in counts)
        if not a.eval_only and self.train_count == 0:
            raise ValueError(f"the training data leaves no sequence of {a.seq_length + 1} tokens (--split {a.split}); "
                             "add data or change --split")

    # ------------------------------------------------------------------ steps
    def _forward_step(self, kind: str):
        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
            if self.dump is not None and output is not None and self._is_loss_chunk(model):
                self.dump.append({"kind": kind, "iteration": self.iteration,
                                  **{k: batch[k].clone() for k in ("tokens", "labels", "loss_mask", "channel_ids")}})
            hook = self.channel_loss
            return output, channel_loss_func(hook, batch["loss_mask"], batch["channel_ids"], kind)
        return forward_step

    @staticmethod
    def _is_loss_chunk(model) -> bool:
        module = model.module if hasattr(model, "module") else model
        return bool(getattr(module, "post_process", False))

    def _run_schedule(self, iterator, forward_only: bool, kind: str) -> torch.Tensor:
        """One global batch through the pipeline; returns this DP rank's ``[loss_sum, tokens]`` (last stage)."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        from megatron.core.pipeline_parallel import get_forward_backward_func

        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step(kind), data_iterator=iterator,
            model=self.model if len(self.model) > 1 else self.model[0], num_microbatches=get_num_microbatches(),
            seq_length=self.args.seq_length, micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64)
        for report in reports or []:
            total += report["lm loss"].double()
        return total

    def train_step(self, iterator) -> bool:
        """Forward, backward, optimizer step; the channel sums of the step join the window only once it is taken."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        for chunk in self.model:
            chunk.train()
        loss = self._run_schedule(iterator, forward_only=False, kind="train")
        ok, self.grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.gbs)
            self.channel_loss.commit_iteration()
            self._window_loss += loss
        else:
            self.channel_loss.discard_iteration()
        self.iteration += 1
        self.consumed += self.gbs
        return ok

    def reduce_window(self, kind: str = "train", loss: Optional[torch.Tensor] = None):
        """One all-reduce of the channel window over DP x CP on last-stage ranks, plus the lm-loss sums."""
        if not self.is_last_stage:
            return None, None
        stats = self.channel_loss.reduce(kind, self.dp_group)
        loss = self._window_loss if loss is None else loss
        total = loss.clone()
        if dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(total, group=self.dp_group)
        if kind == "train":
            self._window_loss.zero_()
        mean = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        return stats, (mean, float(total[1]))

    def evaluate(self, rows, iterations: Optional[int]) -> tuple:
        """Forward-only over ``iterations`` global batches of ``rows`` (None: every row exactly once, padded)."""
        once = iterations is None
        steps = mcore_data.steps_for_once(self.valid_count, self.gbs) if once else iterations
        if once:
            iterator = self.iterators(rows, 0, once=True)
        else:  # like Megatron-LM, successive evaluations continue through the validation data
            if getattr(self, "_valid_iterator", None) is None:
                self._valid_iterator = self.iterators(rows, 0)
            iterator = self._valid_iterator
        for chunk in self.model:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(steps):
                total += self._run_schedule(iterator, forward_only=True, kind="eval")
        return self.reduce_window("eval", total)

    def log(self, kind: str, stats, loss, step: int, extra: str = "") -> None:
        if stats is None:
            return
        mean, tokens = loss
        prefix = "" if kind == "train" else "eval_"
        if self.writer is not None:
            self.writer.add_scalar("lm loss" if kind == "train" else "lm loss validation", mean, step)
            if kind == "train":
                self.writer.add_scalar("learning-rate", self.scheduler.get_lr(self.optimizer.param_groups[0]), step)
            if self.channel_loss.enabled:
                self.channel_loss.write(self.writer, stats, step, kind)
            self.writer.flush()
        if self.rank == dist.get_world_size() - 1:
            channels = self.channel_loss.log_line(stats) if self.channel_loss.enabled else ""
            label = "lm loss" if kind == "train" else "validation lm loss"
            print(f" iteration {step:8d}/{self.args.train_iters:8d} | {label}: {mean:.6E} | "
                  f"{prefix}channel loss: {channels} | {extra}", flush=True)

    def save(self) -> None:
        a = self.args
        mcore_checkpoint.save(a.save, self.iteration, self._saved_args(), self.chunks, self.optimizer,
                              self.scheduler, a.ckpt_format, sidecar_from=a.load,
                              write_sidecar=self._write_scratch_sidecar)
        if self.rank == 0:
            print(f" saved checkpoint at iteration {self.iteration} to {a.save}", flush=True)

    def _saved_args(self) -> argparse.Namespace:
        """The model's Megatron-LM args plus this run's flags and progress, as Megatron-LM saves them."""
        m = argparse.Namespace(**vars(self.plan.model_args))
        for key, value in vars(self.args).items():
            if key not in SHAPE_FLAGS and key not in vars(m) and not key.startswith("dump"):
                setattr(m, key, value)
        m.seq_length = m.encoder_seq_length = self.args.seq_length
        m.micro_batch_size = self.args.micro_batch_size
        m.data_parallel_size = self.plan.dp
        m.world_size = self.plan.world
        m.consumed_train_samples = self.consumed
        m.train_iters = self.args.train_iters
        return m

    def _write_scratch_sidecar(self, root: str) -> None:
        from megatron_bridge import sidecar
        from megatron_bridge.megatron_args import canonical_from_args

        cfg = canonical_from_args(self.plan.model_args)
        sidecar.write_sidecar(root, cfg, family="llama", hf_config=None, name_style="local",
                              assets_from=self.args.tokenizer_model)

    def write_dump(self) -> None:
        if self.dump is None:
            return
        from megatron.core import parallel_state as ps

        os.makedirs(self.args.dump_batches, exist_ok=True)
        path = os.path.join(self.args.dump_batches, f"dp{ps.get_data_parallel_rank()}_rank{self.rank}.pt")
        torch.save({"channels": list(self.plan.channels.names), "batches": self.dump}, path)

    def close(self) -> None:
        self.write_dump()
        if self.writer is not None:
            self.writer.close()


def train(trainer: Trainer) -> None:
    a = trainer.args
    iterator = trainer.iterators(trainer.train_rows, trainer.consumed)
    stop = exit_signal.ExitSignal(a)  # a scheduler's warning: every rank stops after the same step, then saves
    if trainer.rank == 0:
        mode = "resumed" if trainer.resumed else "starting"
        print(f" {mode} at iteration {trainer.iteration} ({trainer.consumed} samples consumed); channels "
              f"{list(trainer.plan.channels.names)}", flush=True)
    window_start = time.time()
    while trainer.iteration < a.train_iters:
        trainer.train_step(iterator)
        it = trainer.iteration
        if it % a.log_interval == 0 or it == a.train_iters:
            stats, loss = trainer.reduce_window("train")
            elapsed = (time.time() - window_start) * 1000 / max(1, (it - 1) % a.log_interval + 1)
            trainer.log("train", stats, loss, it, extra=f"elapsed time per iteration (ms): {elapsed:.1f}")
            window_start = time.time()
        if trainer.valid_count and a.eval_iters and (it % a.eval_interval == 0):
            stats, loss = trainer.evaluate(trainer.valid_rows, a.eval_iters)
            trainer.log("eval", stats, loss, it)
        if a.exit_interval and it % a.exit_interval == 0:
            break
        if stop.agreed():
            if trainer.rank == 0:
                print(f" iteration {it}: {stop.describe()}", flush=True)
            break
        if a.save and a.save_interval and it % a.save_interval == 0 and it < a.train_iters:
            trainer.save()
    if a.save:
        trainer.save()


def eval_only(trainer: Trainer) -> dict:
    stats, loss = trainer.evaluate(trainer.valid_rows, None)
    result = None
    if stats is not None:
        result = {"iteration": trainer.iteration, "loss": loss[0], "tokens": int(loss[1]),
                  "channels": {n: {"loss": s.mean, "tokens": int(s.count)} for n, s in stats.items() if s.count > 0},
                  "samples": len(trainer.plan.eval_samples)}
    trainer.log("eval", stats, loss, trainer.iteration)
    if trainer.rank == dist.get_world_size() - 1 and result is not None:
        width = max(len(n) for n in result["channels"]) if result["channels"] else 7
        print(f"{'channel':<{width}}  {'loss':>12}  {'tokens':>8}")
        for name, row in result["channels"].items():
            print(f"{name:<{width}}  {row['loss']:>12.6f}  {row['tokens']:>8d}")
        print(f"{'all':<{width}}  {result['loss']:>12.6f}  {result['tokens']:>8d}  ({result['samples']} samples)")
        if trainer.args.eval_output:
            tmp = trainer.args.eval_output + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, trainer.args.eval_output)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed()
    trainer = None
    try:
        trainer = Trainer(plan)
        trainer.build_datasets()
        if args.eval_only:
            eval_only(trainer)
        else:
            train(trainer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
