"""SFT data: read JSONL conversations, render them with the chat template, and mask labels to assistant turns.

What it does:

* ``load_jsonl``: reads chat ``messages`` (``role``/``content``), ShareGPT ``conversations`` (``from``/``value``) and
  Alpaca (``instruction``/``input``/``output``) records into one ``Conversation`` shape, with the optional per-sample
  channel; bad records fail with their file and line number.
* ``ensure_chat_template``: the tokenizer's own template, or ChatML when it has none.
* ``tokenize_conversation``: renders the whole conversation once and takes labels only on assistant turns, found as
  character spans between incremental renders, so it works with any template whose renders of a conversation's
  prefixes are prefixes of the whole render (which is what makes them usable for multi-turn inference too).
* ``tokenize_dataset``: tokenizes every record at start-up, truncating over-long samples and counting them, so the
  count can be reported before training instead of samples vanishing silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from launch.jsonl_records import jsonl_objects
from patches.channel_loss import DEFAULT_CHANNEL, IGNORE_INDEX

# ChatML, for tokenizers that ship no template (base models). Its markers are plain text to a tokenizer that lacks
# them as special tokens; that still trains a consistent format without resizing the embedding table.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names and the chat role each one means.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}


@dataclass
class Conversation:
    """One training record in chat form.

    Attributes:
        messages: ``[{"role": ..., "content": ...}]`` with roles from ``CHAT_ROLES``.
        channel: the record's channel, ``None`` for the default channel.
        where: ``"path:line"`` for error messages.
    """

    messages: list[dict[str, str]]
    channel: str | None
    where: str


@dataclass
class TokenizedSample:
    """One conversation as token ids with labels on assistant tokens only (``-100`` elsewhere)."""

    input_ids: list[int]
    labels: list[int]
    channel: str | None
    where: str
    truncated: bool = False


@dataclass
class TokenizeReport:
    """What happened to a dataset at start-up, printed before training."""

    path: str
    num_samples: int = 0
    num_truncated: int = 0
    num_without_labels: int = 0
    max_length: int = 0
    channels: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"{self.path}: {self.num_samples} samples"]
        if self.num_truncated:
            out.append(
                f"  {self.num_truncated} samples longer than max_length={self.max_length} tokens were truncated "
                "(kept, not dropped)"
            )
        if self.num_without_labels:
            out.append(
                f"  {self.num_without_labels} samples have no assistant token left after truncation; they add no loss "
                "(raise --max-length to train on them)"
            )
        for name, count in sorted(self.channels.items()):
            out.append(f"  channel {name!r}: {count} samples")
        return out


def _channel_of(record: dict[str, Any], channel_field: str, where: str) -> str | None:
    """The record's channel as a string; ints are accepted since JSON sources often number their channels."""
    if channel_field not in record or record[channel_field] is None:
        return None
    value = record[channel_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"{where}: field {channel_field!r} is {value!r} ({type(value).__name__}); a channel must be a string "
            "(or an integer), e.g. \"code\""
        )
    value = str(value)
    if not value:
        raise ValueError(f"{where}: field {channel_field!r} is empty; give the channel a name or drop the field")
    return value


def _content(value: Any, where: str, turn: int) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: turn {turn} has content {value!r} ({type(value).__name__}); only text content is supported, "
            "flatten multi-part content to a string"
        )
    return value


def record_to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Normalize one JSON record (chat, ShareGPT or Alpaca) to chat messages.

    Raises:
        ValueError: unknown record shape, unknown role, non-text content, or no assistant turn with text.
    """
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn:
                raise ValueError(
                    f"{where}: turn {i} of 'messages' is {turn!r}; expected {{'role': ..., 'content': ...}}"
                )
            role = turn["role"]
            if role not in CHAT_ROLES:
                raise ValueError(
                    f"{where}: turn {i} has unknown role {role!r}; use one of {list(CHAT_ROLES)}"
                )
            messages.append({"role": role, "content": _content(turn.get("content", ""), where, i)})
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn:
                raise ValueError(
                    f"{where}: turn {i} of 'conversations' is {turn!r}; expected {{'from': ..., 'value': ...}}"
                )
            speaker = turn["from"]
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(
                    f"{where}: turn {i} has unknown role {speaker!r}; use one of {sorted(SHAREGPT_ROLES)}"
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": _content(turn.get("value", ""), where, i)})
    elif "instruction" in record or "output" in record:
        instruction = _content(record.get("instruction", ""), where, 0)
        extra = _content(record.get("input", "") or "", where, 0)
        prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _content(record["system"], where, 0)})
        if prompt:
            messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": _content(record.get("output", ""), where, 1)})
    else:
        raise ValueError(
            f"{where}: record has keys {sorted(record)}; expected 'messages' (role/content), 'conversations' "
            "(from/value) or Alpaca 'instruction'/'input'/'output'"
        )
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError(
            f"{where}: sample has no usable turns (no assistant turn with text), so it would train on nothing; "
            "fix or remove this line"
        )
    return messages


def load_jsonl(path: str, channel_field: str = "channel") -> list[Conversation]:
    """Read a JSONL file of chat, ShareGPT or Alpaca records.

    Args:
        path: the file; blank lines are skipped.
        channel_field: the per-record field that names its channel.

    Raises:
        ValueError: a line that is not JSON or not a valid record, naming ``path:line``.
    """
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist; pass a JSONL file with one sample per line")
    conversations = []
    for _, where, record in jsonl_objects(path):
        messages = record_to_messages(record, where)
        conversations.append(Conversation(messages, _channel_of(record, channel_field, where), where))
    if not conversations:
        raise ValueError(f"data file {path!r} holds no samples")
    return conversations


def ensure_chat_template(tokenizer) -> bool:
    """Give ``tokenizer`` the ChatML template when it has none.

    Returns:
        True when ChatML was installed, so the caller can say so at start-up.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHATML_TEMPLATE
    return True


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant turn.

    A turn's span runs from the end of the render of the turns before it with the generation prompt to the end of the
    render that includes it, so it covers the reply and the template's end-of-turn marker (what the model must learn
    to emit) but not the assistant header (which inference supplies).

    Raises:
        ValueError: the template renders a prefix of the conversation differently from the whole (e.g. it rewrites
            earlier turns), so spans cannot be located.
    """
    messages = conversation.messages
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{conversation.where}: the chat template renders turn {i} differently inside the whole conversation "
                "than as a prefix of it, so assistant tokens cannot be located; use a template without per-position "
                "rewriting (pass --chat-template FILE) or split the conversation"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int) -> TokenizedSample:
    """Token ids and assistant-only labels for one conversation, truncated to ``max_length``.

    The whole render is tokenized at once (what inference sees); a token is supervised when its first character lies
    in an assistant span. Tokenizers without offset mappings (slow ones) tokenize span by span instead.
    """
    text, spans = assistant_spans(tokenizer, conversation)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
        span_i = 0
        for k, (start, _end) in enumerate(enc["offset_mapping"]):
            while span_i < len(spans) and start >= spans[span_i][1]:
                span_i += 1
            if span_i < len(spans) and spans[span_i][0] <= start:
                labels[k] = input_ids[k]
    else:
        input_ids, labels = [], []
        cursor = 0
        for start, end in spans + [(len(text), len(text))]:
            for piece, supervised in ((text[cursor:start], False), (text[start:end], True)):
                if piece:
                    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    input_ids += ids
                    labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            cursor = end
    truncated = len(input_ids) > max_length
    return TokenizedSample(
        input_ids=input_ids[:max_length],
        labels=labels[:max_length],
        channel=conversation.channel,
        where=conversation.where,
        truncated=truncated,
    )


def tokenize_dataset(
    tokenizer, conversations: Sequence[Conversation], max_length: int, path: str = "data"
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenize every conversation; over-long ones are truncated and counted, never dropped."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves nothing to predict; use at least 2 (typically 2048 or more)")
    report = TokenizeReport(path=path, max_length=max_length)
    samples = []
    for conversation in conversations:
        sample = tokenize_conversation(tokenizer, conversation, max_length)
        samples.append(sample)
        report.num_samples += 1
        report.num_truncated += sample.truncated
        # Position 0 is never a target after the causal shift, so a label there alone trains nothing.
        report.num_without_labels += not any(label != IGNORE_INDEX for label in sample.labels[1:])
        name = sample.channel if sample.channel is not None else DEFAULT_CHANNEL
        report.channels[name] = report.channels.get(name, 0) + 1
    return samples, report
