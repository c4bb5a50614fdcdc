"""Typed errors of the library.

Transport-free on purpose: the server maps these kinds to status codes in one table, the CLI
prints their messages. Every message says what is wrong and what to do about it.
"""

from __future__ import annotations

import uuid


class AdapterFusionError(Exception):
    """Base of every error this library raises on bad input or state."""


class AdapterFormatError(AdapterFusionError):
    """An adapter directory is missing, truncated, malformed or inconsistent with its config."""


class UnsupportedAdapterError(AdapterFormatError):
    """A valid PEFT adapter that uses features this library does not compose (DoRA, non-LoRA...)."""


class IncompatibleAdaptersError(AdapterFusionError):
    """Sources that cannot be combined: different base models or disagreeing shapes."""


class RecipeError(AdapterFusionError, ValueError):
    """A recipe or method parameters that fail validation."""


class OutputExistsError(AdapterFusionError):
    """The output path exists and overwriting was not asked for."""


class InvalidRequestError(AdapterFusionError, ValueError):
    """A request whose values are out of range or malformed (sampling settings, empty prompt)."""


class NotFoundError(AdapterFusionError, LookupError):
    """A named adapter that is not registered."""


class AlreadyExistsError(AdapterFusionError):
    """A name already registered for something else."""


class LimitExceededError(AdapterFusionError):
    """A request over a configured cap (tokens, prompt length, queue, memory budget)."""


class PathNotAllowedError(AdapterFusionError, PermissionError):
    """A path outside the configured roots (after resolving `..` and symlinks)."""


class UnavailableError(AdapterFusionError):
    """The server cannot take this call now (draining, or the engine restarting): retry, maybe elsewhere."""


class ShuttingDownError(UnavailableError):
    """The server is draining: new calls are refused while in-flight ones finish."""


class RequestCancelledError(AdapterFusionError):
    """The client cancelled the call or its deadline passed; its work was abandoned."""


class EngineFaultError(AdapterFusionError):
    """The engine thread failed while holding this request; the traceback is logged under `error_id`."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the serving engine failed while running this request (error id {error_id}); retry it")
        self.error_id = error_id


def new_error_id() -> str:
    """A short id that joins what a client is told to the traceback in the server's log."""
    return uuid.uuid4().hex[:12]


def quoted(text: str, limit: int = 64) -> str:
    """`text` quoted for an error message, cut to `limit` characters: a client's 10 KB name must
    not come back as a 10 KB error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
