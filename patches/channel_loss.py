"""Per-channel loss accounting, free of any training framework.

Every sample may carry a channel (its data source). One global loss curve hides which channel is learned and which is
forgotten, so training reports one curve per channel. This module owns the arithmetic; the Hugging Face Trainer
integration (``patches/hf_trainer_channel_loss.py``) and a future megatron-core integration only feed it per-token
losses and read the reduced figures back.

What it does:

* ``ChannelIndex``: channel name <-> integer id, fixed at start-up from the data, so the hot loop only moves integer
  tensors (no object gathers, no string handling per step).
* ``ChannelLossAccumulator``: one ``[num_channels, 2]`` float64 tensor of ``[loss_sum, count]``, summed over
  micro-batches and the whole logging window without a host sync, then one ``all_reduce(SUM)`` over the data-parallel
  group at log time, then a single division (sum, then divide once: never an average of averages).
* ``shifted_token_losses``: the causal-LM per-token cross entropy, aligned with the labels the model predicts, for
  integrations that compute the loss themselves.

Only ``torch`` is imported here on purpose: megatron-core's ``pretrain_gpt`` loss function already holds per-token
losses and can reuse this module unchanged (reduce over DP x CP, never over TP).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

DEFAULT_CHANNEL = "default"
IGNORE_INDEX = -100

# Token mean weighs every supervised token equally (Megatron's per-token loss); sample mean first averages inside each
# sample so that long samples do not dominate a channel.
MODES = ("token", "sample")


class ChannelIndex:
    """A fixed, ordered mapping between channel names and integer ids.

    The order is sorted by name, so every rank that reads the same data builds the same index without talking to the
    others (``fingerprint`` lets callers check that once at start-up).

    Args:
        names: channel names; duplicates are ignored.
    """

    def __init__(self, names: Iterable[str]):
        unique = sorted(set(names))
        for name in unique:
            if not isinstance(name, str) or not name:
                raise ValueError(f"channel names must be non-empty strings, got {name!r}; give every channel a name")
        if not unique:
            raise ValueError("no channel names given; pass at least one (e.g. 'default')")
        self.names: tuple[str, ...] = tuple(unique)
        self._ids = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._ids

    def id(self, name: str) -> int:
        """The integer id of ``name``; unknown names are an error, since the index is fixed at start-up."""
        try:
            return self._ids[name]
        except KeyError:
            raise ValueError(
                f"channel {name!r} is not in the channel index {list(self.names)}; channels are discovered from the "
                "data at start-up, so build the index from every dataset (train and eval) before training"
            ) from None

    def fingerprint(self) -> str:
        """A short hash of the ordered names, to compare across ranks once at start-up."""
        return hashlib.sha1("\0".join(self.names).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ChannelIndex({list(self.names)})"


@dataclass(frozen=True)
class ChannelStat:
    """One channel's reduced figures over a logging window.

    Attributes:
        loss_sum: sum of token losses (token mode) or of per-sample mean losses (sample mode).
        count: number of supervised tokens (token mode) or of samples (sample mode).
    """

    loss_sum: float
    count: float

    @property
    def mean(self) -> float:
        """The window's loss for this channel: the sum divided once by the count."""
        return self.loss_sum / self.count if self.count > 0 else float("nan")


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token causal-LM cross entropy, aligned with the token each position predicts.

    Position ``t`` predicts ``labels[:, t + 1]``; this is the same loss as Hugging Face's ``ForCausalLMLoss`` (fp32
    logits, ``ignore_index=-100``) but kept per token so the caller can both sum it for the gradient and attribute it
    to channels, instead of running the cross entropy twice.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]``, ``-100`` where no loss is taken.

    Returns:
        ``(token_loss, valid)``, both ``[batch, seq - 1]``: fp32 losses (0 where ignored) and the bool mask of
        supervised positions.
    """
    # Shift the labels, not the logits: slicing the [batch, seq, vocab] logits would copy the largest activation
    # of the step (transformers pads the labels for the same reason).
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    vocab = logits.size(-1)
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(shift_labels)[:, :-1]
    valid = shift_labels[:, :-1].ne(IGNORE_INDEX)
    return token_loss, valid


class ChannelLossAccumulator:
    """Sums ``[loss_sum, count]`` per channel over micro-batches and a logging window, reduced once at log time.

    ``add`` only launches tensor ops (no ``.item()``, no boolean indexing), so it never forces a host-device sync in
    the training loop. ``reduce`` is the only collective: one ``all_reduce(SUM)`` of a ``[channels, 2]`` tensor.

    Args:
        index: the channel index fixed at start-up.
        device: where the running sums live (the device the losses are computed on).
        mode: ``"token"`` (token mean, the default) or ``"sample"`` (mean of per-sample token means).
        dtype: accumulation dtype; float64 keeps long windows exact to well below the reported precision.
    """

    def __init__(
        self,
        index: ChannelIndex,
        device: torch.device | str | None = None,
        mode: str = "token",
        dtype: torch.dtype = torch.float64,
    ):
        if mode not in MODES:
            raise ValueError(f"channel loss mode {mode!r} is not one of {MODES}; use 'token' (Megatron's) or 'sample'")
        self.index = index
        self.mode = mode
        self.sums = torch.zeros(len(index), 2, dtype=dtype, device=device)

    @property
    def count_name(self) -> str:
        """What ``count`` counts, for log keys: tokens in token mode, samples in sample mode."""
        return "tokens" if self.mode == "token" else "samples"

    @torch.no_grad()
    def add(
        self,
        token_loss: torch.Tensor,
        channel_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch.

        Args:
            token_loss: per-token losses, any shape.
            channel_ids: channel id per token, same shape; negative ids (padding) are ignored.
            mask: bool, same shape; ``False`` where no loss is taken (prompt tokens, padding).
            sample_ids: sample mode only: an id per token, unique per sample within this micro-batch (packed
                sub-samples get distinct ids), in ``[0, numel)``; negative ids are ignored.
        """
        loss = token_loss.detach().reshape(-1).to(self.sums.dtype)
        channels = channel_ids.reshape(-1).to(self.sums.device)
        keep = channels.ge(0)
        if mask is not None:
            keep = keep & mask.reshape(-1).to(keep.device)
        # Masked tokens are routed to channel 0 with zero weight instead of being indexed out: boolean indexing would
        # need the number of kept tokens on the host, i.e. a sync per micro-batch.
        weight = keep.to(self.sums.dtype)
        safe_channels = torch.where(keep, channels, torch.zeros_like(channels))
        if self.mode == "token":
            self.sums.index_add_(0, safe_channels, torch.stack((loss * weight, weight), dim=1))
            return

        if sample_ids is None:
            raise ValueError("channel loss mode 'sample' needs sample_ids per token; pass them or use mode='token'")
        samples = sample_ids.reshape(-1).to(self.sums.device)
        keep = keep & samples.ge(0)
        weight = keep.to(self.sums.dtype)
        safe_samples = torch.where(keep, samples, torch.zeros_like(samples))
        n = samples.numel()
        # Per-sample [loss_sum, token_count], sized by the token count so no host sync is needed to size it.
        per_sample = torch.zeros(n, 2, dtype=self.sums.dtype, device=self.sums.device)
        per_sample.index_add_(0, safe_samples, torch.stack((loss * weight, weight), dim=1))
        # Every kept token of a sample carries the sample's channel; masked tokens vote -1, so the max is the channel.
        votes = torch.where(keep, channels, torch.full_like(channels, -1))
        sample_channel = torch.full((n,), -1, dtype=channels.dtype, device=channels.device)
        sample_channel.scatter_reduce_(0, safe_samples, votes, reduce="amax")
        sample_channel.clamp_(min=0)  # samples without a kept token get weight 0 below, any valid row will do
        has_tokens = per_sample[:, 1].gt(0)
        sample_mean = per_sample[:, 0] / per_sample[:, 1].clamp(min=1)
        present = has_tokens.to(self.sums.dtype)
        self.sums.index_add_(0, sample_channel, torch.stack((sample_mean * present, present), dim=1))

    def reduce(self, group: "dist.ProcessGroup | None" = None, reset: bool = True) -> dict[str, ChannelStat]:
        """Sum the window over the data-parallel group and return every channel's figures.

        Every rank of ``group`` must call this at the same point (it is a collective when a process group is
        initialized). In Megatron, pass the data-parallel (x context-parallel) group, never the tensor-parallel one:
        each TP rank already holds the full per-token loss.

        Args:
            group: the data-parallel process group; ``None`` means the default (world) group.
            reset: start a new window afterwards.

        Returns:
            ``{channel name: ChannelStat}`` for every channel of the index, including those with count 0.
        """
        totals = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        if reset:
            self.sums.zero_()
        rows = totals.cpu().tolist()
        return {name: ChannelStat(loss_sum=row[0], count=row[1]) for name, row in zip(self.index.names, rows)}


def stats_to_logs(
    stats: Mapping[str, ChannelStat], prefix: str = "", count_name: str = "tokens"
) -> dict[str, float]:
    """Flatten reduced stats into log keys ``<prefix>channel_loss/<name>`` and ``<prefix>channel_<count_name>/<name>``.

    Channels with no supervised token in the window are left out rather than logged as NaN, which would break
    smoothing in TensorBoard and min/max in other loggers.
    """
    logs: dict[str, float] = {}
    for name, stat in stats.items():
        if stat.count > 0:
            logs[f"{prefix}channel_loss/{name}"] = stat.mean
            logs[f"{prefix}channel_{count_name}/{name}"] = stat.count
    return logs


def check_same_index_across_ranks(index: ChannelIndex, group: "dist.ProcessGroup | None" = None) -> None:
    """Fail early, once, if ranks built different channel indices (they would silently mix channels in the sum)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    prints: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(prints, index.fingerprint(), group=group)
    if len(set(prints)) != 1:
        raise ValueError(
            f"ranks built different channel indices (fingerprints {prints}); this rank has {list(index.names)}. "
            "Every rank must read the same train and eval files so channels are discovered identically"
        )


def build_index(channels: Sequence[str | None]) -> ChannelIndex:
    """A channel index from per-sample channels, where ``None`` means the default channel."""
    return ChannelIndex(DEFAULT_CHANNEL if c is None else c for c in channels)
