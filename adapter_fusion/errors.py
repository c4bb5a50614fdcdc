"""Typed errors of the library.

Transport-free on purpose: the server maps these kinds to status codes in one table, the CLI
prints their messages. Every message says what is wrong and what to do about it.
"""

from __future__ import annotations


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


class ShuttingDownError(AdapterFusionError):
    """The server is draining: new calls are refused while in-flight ones finish."""
