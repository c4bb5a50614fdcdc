"""Read a small JSON file that anyone may have written (an adapter's config, a store entry's
metadata) without letting it stop the reader: its size is checked before a byte is read, and its
nesting is bounded (the json module recurses, so `[` x 200,000 raises RecursionError, which no
`except ValueError` catches). Every refusal is a ValueError, as a malformed file already was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_DEPTH = 32  # PEFT configs and store metadata nest 3 deep; anything far deeper is not one


def read_json(path: str | Path, max_bytes: int, max_depth: int = MAX_DEPTH) -> object:
    """The JSON value in `path`, if the file is at most `max_bytes` and nests at most `max_depth`."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{size} bytes; the limit is {max_bytes}")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise ValueError(f"over {max_bytes} bytes")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    _check_depth(value, max_depth)
    return value


def _check_depth(value: object, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)
