"""Channel loss for megatron-core training loops: the loss-function hook and the once-per-window reduction.

Megatron computes the loss only on the last pipeline stage, where every tensor-parallel rank already holds the full
per-token loss (vocab-parallel cross entropy reduces over TP inside the model). So the hook:

* adds each micro-batch's per-token losses into a ``[channels, 2]`` tensor of ``[loss_sum, token_count]`` with the
  channel id of every token (packed sequences attribute each token to its own sample), without any collective or
  host sync (``patches.channel_loss.ChannelLossAccumulator`` does the arithmetic);
* keeps the iteration's sums apart until the optimizer step is committed (``commit_iteration``), so a re-run of
  forward/backward (Megatron-LM's ``rerun_mode``) or a skipped step never counts twice;
* reduces the whole logging window with one ``all_reduce(SUM)`` over the data-parallel (x context-parallel) group
  (``reduce``), never over TP and never per micro-batch, called by every last-stage rank at log time;
* writes ``channel_loss/<name>`` and ``channel_tokens/<name>`` (``eval_`` prefixed for evaluation) on the rank that
  owns the TensorBoard writer, leaving out channels without tokens in the window (never NaN).

Only ``torch`` and ``patches.channel_loss`` are imported, so an upstream Megatron-LM ``pretrain_gpt.py`` can use the
same hook (see ``patches/``' upstream patch) as ``launch.pretrain_gpt`` does.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from patches.channel_loss import ChannelIndex, ChannelLossAccumulator, ChannelStat, stats_to_logs


class MegatronChannelLoss:
    """Per-channel ``[sum, count]`` for a megatron-core loss function, reduced once per logging window.

    Args:
        index: the channel index fixed at start-up, identical on every rank.
        device: where the sums live (the device the losses are on).
        enabled: a switch, so a benchmark can compare on and off inside one run.
    """

    def __init__(self, index: ChannelIndex, device: torch.device | str | None = None, enabled: bool = True):
        self.index = index
        self.enabled = enabled
        self._iteration = ChannelLossAccumulator(index, device)
        self._window = {"train": ChannelLossAccumulator(index, device), "eval": ChannelLossAccumulator(index, device)}

    # ------------------------------------------------------------------ hot path (per micro-batch, no collective)
    @torch.no_grad()
    def add(self, token_loss: torch.Tensor, channel_ids: torch.Tensor, loss_mask: torch.Tensor,
            kind: str = "train") -> None:
        """Add one micro-batch's per-token losses (``[b, s]``) by the channel of each token.

        Training micro-batches go to the iteration's scratch sums (see ``commit_iteration``); evaluation ones
        straight into the evaluation window. Tokens with ``loss_mask == 0`` or a negative channel id are ignored.
        """
        if not self.enabled:
            return
        target = self._iteration if kind == "train" else self._window[kind]
        target.add(token_loss, channel_ids, loss_mask.bool())

    def commit_iteration(self) -> None:
        """The optimizer step happened: the iteration's sums join the training window."""
        self._window["train"].sums += self._iteration.sums
        self._iteration.sums.zero_()

    def discard_iteration(self) -> None:
        """Forward/backward will be re-run (or the step was skipped): forget the iteration's sums."""
        self._iteration.sums.zero_()

    def loss_func(self, loss_mask: torch.Tensor, channel_ids: torch.Tensor, output_tensor: torch.Tensor,
                  kind: str = "train"):
        """Megatron-LM's ``loss_func`` (``pretrain_gpt.py``) plus the channel accounting.

        Returns ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``, the three-tuple megatron-core's
        schedule divides by the token count and the number of micro-batches.
        """
        losses = output_tensor.float()
        mask = loss_mask.float()
        loss = torch.sum(losses.view(-1) * mask.view(-1))
        num_tokens = mask.sum().clone().detach().to(torch.int)
        self.add(losses, channel_ids, mask, kind)
        report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}
        return loss, num_tokens, report

    # ------------------------------------------------------------------ log time (one collective per window)
    def reduce(self, kind: str = "train", group: "dist.ProcessGroup | None" = None) -> dict[str, ChannelStat]:
        """Sum the window over ``group`` (data-parallel x context-parallel) and start a new window.

        Every last-stage rank must call this at the same point, enabled or not, so the collective always matches.
        """
        return self._window[kind].reduce(group)

    @staticmethod
    def logs(stats: Mapping[str, ChannelStat], kind: str = "train") -> dict[str, float]:
        """``{channel_loss/<name>: mean, channel_tokens/<name>: count}`` (``eval_`` prefixed), empty channels left
        out."""
        return stats_to_logs(stats, prefix="eval_" if kind == "eval" else "")

    @staticmethod
    def write(writer, stats: Mapping[str, ChannelStat], step: int, kind: str = "train") -> dict[str, float]:
        """Write the figures as TensorBoard scalars (``writer`` may be None on ranks without one)."""
        logs = MegatronChannelLoss.logs(stats, kind)
        if writer is not None:
            for tag, value in logs.items():
                writer.add_scalar(tag, value, step)
        return logs

    @staticmethod
    def log_line(stats: Mapping[str, ChannelStat]) -> str:
        """``name loss (tokens) | ...`` for the console log line; empty channels left out."""
        return " | ".join(f"{name} {s.mean:.6E} ({int(s.count)} tok)" for name, s in stats.items() if s.count > 0)


def channel_loss_func(hook: Optional[MegatronChannelLoss], loss_mask: torch.Tensor, channel_ids: torch.Tensor,
                      kind: str = "train") -> Callable[[torch.Tensor], tuple]:
    """The ``loss_func`` a megatron-core ``forward_step`` returns: with channel accounting when ``hook`` is given,
    Megatron-LM's plain loss otherwise (the same numbers either way)."""
    if hook is not None:
        return lambda output_tensor: hook.loss_func(loss_mask, channel_ids, output_tensor, kind)

    def plain(output_tensor: torch.Tensor):
        mask = loss_mask.float().view(-1)
        loss = torch.sum(output_tensor.float().view(-1) * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])}

    return plain
