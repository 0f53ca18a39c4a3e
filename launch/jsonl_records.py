"""Read a JSONL data file as (line number, "path:line", object) for every non-blank line.

Every data reader of the project (SFT, post-pretraining, pretrain_gpt's SFT data) reports bad input with its
`path:line`, so the one loop that finds lines and refuses what is not a JSON object lives here.
"""
from __future__ import annotations

import json
from typing import Iterator


def jsonl_objects(path: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, "path:line", record) per non-blank line; a line that is not one JSON object raises
    ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: line is {type(record).__name__}, expected a JSON object")
            yield lineno, where, record
