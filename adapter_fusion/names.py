"""Adapter names: what a client may call an adapter, and the names the server keeps for itself.

Client names become directory names in the store: letters, digits, '.', '_', '-', starting with
a letter or digit, at most 128. Names the server gives its own entries (inline compositions,
search groups) start with `HIDDEN`, which no client name can, so no client can take one first or
address what it holds. Torch-free: clients and plugins check names without the library.
"""

from __future__ import annotations

import re

from adapter_fusion.errors import InvalidRequestError, NotFoundError, quoted

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would let a trailing newline through
HIDDEN = "~"


def check_name(name: str) -> str:
    """`name` if a client may use it, else INVALID_ARGUMENT saying what a name may be."""
    if not NAME.match(name):
        raise InvalidRequestError(
            f"invalid adapter name {quoted(name)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def hidden_name(kind: str, key: str) -> str:
    """A name in the server's own namespace: `kind` says what holds it, `key` which one."""
    return f"{HIDDEN}{kind}-{key}"


def not_hidden(name: str) -> str:
    """`name` as a client sent it to address an adapter; the server's own entries are not the
    client's to use (NOT_FOUND, as for any name that is not loaded)."""
    if name.startswith(HIDDEN):
        raise NotFoundError(f"no adapter named {quoted(name)} is loaded; call LoadAdapter first")
    return name
