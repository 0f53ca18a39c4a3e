"""Save and stop on a signal, together: Megatron-LM's `--exit-signal-handler`, for launch.pretrain_gpt.

A cluster scheduler warns a job before its time limit (Slurm: `--signal=B:USR1@300`); the job then has a few
minutes to write a checkpoint. The signal reaches each rank at its own moment, but a checkpoint is a collective
write, so no rank may stop on its own: the handler only raises a flag, and after every optimizer step all ranks
agree (one MAX all-reduce of one integer) whether any rank has seen it. They then stop after the same step and
save, as Megatron-LM's DistributedSignalHandler does (it all-gathers the flags; a MAX says the same).
"""
from __future__ import annotations

import signal
from typing import Optional

# The signals a launcher may choose; SIGUSR1 is what launch.slurm sends, because torchrun treats SIGTERM as "stop
# the workers now" while it leaves SIGUSR1 to them (the Slurm script starts torchrun with SIGUSR1 ignored).
CHOICES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def add_flags(group) -> None:
    """`--exit-signal-handler` and `--exit-signal`, spelled as Megatron-LM spells them."""
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on --exit-signal, every rank stops after the same step and the run saves to --save "
                            "(how a job survives a scheduler's time limit or preemption)")
    group.add_argument("--exit-signal", default="SIGTERM", choices=CHOICES,
                       help="the signal --exit-signal-handler waits for")


class ExitSignal:
    """Install with `ExitSignal(args)`; call `agreed()` after each step: True on every rank once any rank saw it."""

    def __init__(self, args) -> None:
        self.enabled = bool(getattr(args, "exit_signal_handler", False))
        self.received = False
        self.signum: Optional[int] = None
        if self.enabled:
            self.signum = int(getattr(signal, args.exit_signal))
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # nothing else here: the main thread may be inside a collective

    def agreed(self) -> bool:
        if not self.enabled:
            return False
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def describe(self) -> str:
        return f"received {signal.Signals(self.signum).name}: saving and exiting"


def trainer_callback(args):
    """The same for the Hugging Face Trainer scripts (sft, pretrain_hf): on the agreed signal the Trainer writes a
    checkpoint-N at once and stops; `stopped_at` tells the script to skip its final save, since the run is not
    finished, and the next run resumes from that checkpoint."""
    from transformers import TrainerCallback

    class SaveAndStopOnSignal(TrainerCallback):
        def __init__(self) -> None:
            self.signal = ExitSignal(args)
            self.stopped_at: Optional[int] = None

        def on_step_end(self, targs, state, control, **kwargs):
            if self.signal.agreed():  # every rank, every step: the ranks step together
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
                if state.is_world_process_zero:
                    print(f"step {state.global_step}: {self.signal.describe()}", flush=True)
            return control

    return SaveAndStopOnSignal()
