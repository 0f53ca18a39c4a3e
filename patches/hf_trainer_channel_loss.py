"""Channel loss on the Hugging Face ``Trainer``.

What it does:

* ``ChannelLossMixin`` (and ``ChannelLossTrainer``): computes the causal-LM loss once per micro-batch as per-token
  losses, sums them for the gradient exactly as ``transformers`` does (same normalization by ``num_items_in_batch``,
  same gradient-accumulation scaling), and feeds the same per-token losses to a ``ChannelLossAccumulator``. At each
  training log it reduces the window (one ``all_reduce``) and adds ``channel_loss/<name>`` and
  ``channel_tokens/<name>`` to the logs; evaluation adds ``eval_channel_loss/<name>``. The values go through
  ``Trainer.log``, so the log history and every reporting callback see them.
* ``ChannelTensorBoardCallback``: the stock TensorBoard callback, except that channel keys keep their own top-level
  section (``channel_loss/<name>``, ``eval_channel_loss/<name>``) instead of being buried under ``train/``, plus a
  custom-scalars layout that overlays all channels in one chart.

Batches carry ``channel_ids`` and ``sample_ids`` per token (see ``launch/sft_packing.py``); they are removed before the
model's forward, whether channel loss is on or off.
"""
from __future__ import annotations

import torch
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import rewrite_logs

from patches.channel_loss import (
    ChannelIndex,
    ChannelLossAccumulator,
    check_same_index_across_ranks,
    shifted_token_losses,
    stats_to_logs,
)

CHANNEL_KEYS = ("channel_loss/", "channel_tokens/", "channel_samples/")


class ChannelLossMixin:
    """Adds channel loss to a ``Trainer`` subclass; put it before ``Trainer`` in the bases.

    Keyword Args:
        channel_index: the channel index fixed at start-up; ``None`` turns channel loss off (channel fields in
            batches are then only stripped).
        channel_loss_mode: ``"token"`` (token mean, default) or ``"sample"``.
        channel_loss_group: the data-parallel process group to reduce over; ``None`` is the world group, which is
            the data-parallel group for DDP, ZeRO and FSDP.
    """

    def __init__(
        self,
        *args,
        channel_index: ChannelIndex | None = None,
        channel_loss_mode: str = "token",
        channel_loss_group=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.channel_index = channel_index
        self.channel_loss_group = channel_loss_group
        # A switch rather than a rebuild, so a benchmark can compare on and off inside one run.
        self.channel_loss_enabled = channel_index is not None
        self._channel_train = self._channel_eval = None
        if channel_index is not None:
            check_same_index_across_ranks(channel_index, channel_loss_group)
            self._channel_train = ChannelLossAccumulator(channel_index, self.args.device, channel_loss_mode)
            self._channel_eval = ChannelLossAccumulator(channel_index, self.args.device, channel_loss_mode)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The causal-LM loss, from per-token losses that also feed the channel accumulators."""
        channel_ids = inputs.pop("channel_ids", None)
        sample_ids = inputs.pop("sample_ids", None)
        if not self.channel_loss_enabled or channel_ids is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        labels = inputs.pop("labels")
        outputs = model(**inputs)
        token_loss, valid = shifted_token_losses(outputs["logits"], labels)
        # Mirror transformers' ForCausalLMLoss: sum / num_items_in_batch when the Trainer counted the items of the whole
        # accumulated batch (it then skips the division by gradient-accumulation steps), else a per-micro-batch mean.
        if num_items_in_batch is not None:
            loss = token_loss.sum() / num_items_in_batch
        else:
            loss = token_loss.sum() / valid.sum().clamp(min=1)
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            # num_items_in_batch counts all ranks' tokens while DDP averages gradients: scale back (as Trainer does).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        training = model.training
        counted = valid
        if not training:
            counted = valid & self._real_eval_rows(labels.shape[0], valid.device)[:, None]
        accumulator = self._channel_train if training else self._channel_eval
        sample_ids = sample_ids[:, 1:] if sample_ids is not None else None
        accumulator.add(token_loss, channel_ids[:, 1:], counted, sample_ids)

        if return_outputs:
            outputs["loss"] = loss
            return loss, outputs
        return loss

    def _real_eval_rows(self, rows: int, device) -> torch.Tensor:
        """Which rows of this eval batch are real, not padding that makes the last batch even across ranks.

        With ``even_batches`` accelerate completes the last global batch with samples from the start of the dataset;
        its ``gather_for_metrics`` keeps the first ``remainder`` rows in rank order, and so does this.
        """
        real = torch.ones(rows, dtype=torch.bool, device=device)
        state = self.accelerator.gradient_state
        if (
            self.args.world_size > 1
            and getattr(self.accelerator, "even_batches", True)
            and state.end_of_dataloader
            and state.remainder > 0
            and rows == self.args.per_device_eval_batch_size
        ):
            first = self.args.process_index * rows
            real = torch.arange(first, first + rows, device=device) < state.remainder
        return real

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the training window's channel figures to a training log; every rank gets here, so it can reduce."""
        is_train_window = "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)
        if self._channel_train is not None and is_train_window:
            stats = self._channel_train.reduce(self.channel_loss_group)
            if self.channel_loss_enabled:
                logs.update(stats_to_logs(stats, count_name=self._channel_train.count_name))
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Run the stock loop, then add ``<prefix>_channel_loss/<name>`` from this evaluation's samples."""
        if self._channel_eval is not None:
            self._channel_eval.sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._channel_eval is not None:
            stats = self._channel_eval.reduce(self.channel_loss_group)
            if self.channel_loss_enabled:
                output.metrics.update(stats_to_logs(stats, f"{metric_key_prefix}_", self._channel_eval.count_name))
        return output


class ChannelLossTrainer(ChannelLossMixin, Trainer):
    """``transformers.Trainer`` with channel loss."""


def _is_channel_key(key: str) -> bool:
    key = key.split("_", 1)[1] if key.startswith(("eval_", "test_")) else key
    return key.startswith(CHANNEL_KEYS)


class ChannelTensorBoardCallback(TensorBoardCallback):
    """TensorBoard logging with channel curves under ``channel_loss/`` and ``eval_channel_loss/``.

    Args:
        channel_names: channels for the overlay chart (custom-scalars layout).
        logging_dir: where event files go; defaults to the Trainer's ``<output_dir>/runs/<time>_<host>``.
    """

    def __init__(self, channel_names=(), logging_dir: str | None = None, tb_writer=None):
        super().__init__(tb_writer=tb_writer)
        self.channel_names = list(channel_names)
        if logging_dir is not None:
            self.logging_dir = logging_dir

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and self.tb_writer is not None and self.channel_names:
            self.tb_writer.add_custom_scalars(
                {
                    "channel loss": {
                        "train": ["Multiline", [r"^channel_loss/"]],
                        "eval": ["Multiline", [r"^eval_channel_loss/"]],
                    }
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        channel = {k: v for k, v in logs.items() if _is_channel_key(k)}
        rest = rewrite_logs({k: v for k, v in logs.items() if k not in channel})
        for key, value in {**rest, **channel}.items():
            if isinstance(value, (int, float)):
                self.tb_writer.add_scalar(key, value, state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
        self.tb_writer.flush()


def use_channel_tensorboard(trainer: Trainer, channel_names=(), logging_dir: str | None = None) -> bool:
    """Swap the stock TensorBoard callback of ``trainer`` (present when ``report_to`` has it) for the channel one.

    Returns:
        True when a TensorBoard callback was present and replaced.
    """
    if trainer.pop_callback(TensorBoardCallback) is None:
        return False
    trainer.add_callback(ChannelTensorBoardCallback(channel_names, logging_dir))
    return True
