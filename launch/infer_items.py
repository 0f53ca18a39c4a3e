"""Input JSONL -> work items for multi-replica inference: validation, effective generation settings, resume keys.

One line is one item: `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}` (the chat
template is applied), an optional `id`, and optional per-item generation overrides (`max_new_tokens`,
`temperature`, `top_p`, `seed`). Other keys are carried by the user and ignored here.

Why a key per item: a re-run must skip what is done and redo what changed. The key hashes the id, the prompt (or
messages) and the item's effective generation settings, so an edited prompt or a changed setting is never served
a stale answer, and an item is found again even when lines were inserted above it.

A malformed line is a `Problem` (1-based line number and why), never an exception: the caller decides; the
launcher reports every one before any model loads and runs the rest (see multi_infer).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# Generation settings a run sets with flags and a line may override. (name, default, check, what a value must be)
SETTINGS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "max_new_tokens": (128, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "temperature": (0.0, lambda v: _number(v) and v >= 0, "a number >= 0 (0 is greedy)"),
    "top_p": (1.0, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (0, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
}
DEFAULTS = {name: spec[0] for name, spec in SETTINGS.items()}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_settings(settings: dict, where: str) -> dict:
    """Run-level settings (flags): unknown names and bad values are a ValueError naming them."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown generation setting(s) {unknown}; known: {sorted(SETTINGS)}")
    for name, value in settings.items():
        _, ok, what = SETTINGS[name]
        if not ok(value):
            raise ValueError(f"{where}: {name}={value!r} must be {what}")
    return {**DEFAULTS, **settings}


def normalized(settings: dict) -> dict:
    """Settings as hashed and stored: floats as floats, so `temperature: 0` and `0.0` are the same run."""
    return {k: float(v) if k in ("temperature", "top_p") else int(v) for k, v in sorted(settings.items())}


@dataclass
class Item:
    index: int                      # 0-based physical line index in the input file
    id: Any                         # the input's id, or `index`
    prompt: Optional[str]
    messages: Optional[list]
    settings: dict                  # effective generation settings (run defaults + this line's overrides)
    key: str = ""
    size: int = 0                   # characters of prompt text: a tokenizer-free proxy for sorting by length

    def __post_init__(self):
        self.settings = normalized(self.settings)
        self.key = item_key(self.id, self.prompt, self.messages, self.settings)
        text = self.prompt if self.prompt is not None else "".join(str(m.get("content", "")) for m in self.messages)
        self.size = len(text)

    def to_wire(self, attempt: int = 0) -> dict:
        """What a worker needs (plain types: it crosses a process pipe)."""
        return {"index": self.index, "id": self.id, "key": self.key, "prompt": self.prompt,
                "messages": self.messages, "settings": self.settings, "attempt": attempt}


@dataclass
class Problem:
    line: int                       # 1-based, as editors show it
    index: int                      # 0-based line index (the id the output row gets)
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class InputFile:
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0                  # physical lines read (blank ones included)


def item_key(item_id, prompt, messages, settings: dict) -> str:
    blob = json.dumps([item_id, prompt, messages, normalized(settings)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _check_messages(messages) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {\"role\": ..., \"content\": ...}"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return f"messages[{j}] must be an object with a string `role` and a `content`"
    return None


def parse_line(text: str, index: int, defaults: dict) -> Item | Problem:
    """One JSONL line -> Item, or a Problem saying what is wrong and how to fix it."""
    line = index + 1
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Problem(line, index, f"not JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return Problem(line, index, f"a JSON {type(obj).__name__}, expected an object with `prompt` or `messages`")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return Problem(line, index, "needs exactly one of `prompt` (a string) or `messages` (a chat)"
                       if not has_prompt else "has both `prompt` and `messages`; keep one")
    if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        return Problem(line, index, "`prompt` must be a non-empty string")
    if has_messages:
        why = _check_messages(obj["messages"])
        if why:
            return Problem(line, index, why)
    item_id = obj.get("id", index)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        return Problem(line, index, f"`id` must be a string or an integer, not {type(item_id).__name__}")
    settings = dict(defaults)
    for name, (_, ok, what) in SETTINGS.items():
        if name in obj:
            if not ok(obj[name]):
                return Problem(line, index, f"{name}={obj[name]!r} must be {what}")
            settings[name] = obj[name]
    return Item(index=index, id=item_id, prompt=obj.get("prompt"), messages=obj.get("messages"), settings=settings)


def read_input(path: str, defaults: dict) -> InputFile:
    """Every line of a JSONL file; blank lines are skipped (they are no item and get no output row)."""
    out = InputFile()
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            out.lines = index + 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.problems.append(Problem(index + 1, index, f"not UTF-8 (byte {e.start})"))
                continue
            if not text.strip():
                continue
            parsed = parse_line(text, index, defaults)
            (out.items if isinstance(parsed, Item) else out.problems).append(parsed)
    return out


def node_slice(items: list[Item], nodes: int, rank: int) -> list[Item]:
    """Node `rank`'s share: every nodes-th line, so long and short prompts spread evenly over the nodes."""
    return [it for it in items if it.index % nodes == rank]


__all__ = ["DEFAULTS", "SETTINGS", "InputFile", "Item", "Problem", "check_settings", "item_key", "node_slice",
           "normalized", "parse_line", "read_input"]
