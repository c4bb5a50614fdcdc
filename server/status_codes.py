"""The one table from library errors to gRPC status codes. Anything else is a bug: INTERNAL."""

from __future__ import annotations

import grpc

from adapter_fusion.errors import (
    AdapterFormatError,
    AlreadyExistsError,
    EngineFaultError,
    IncompatibleAdaptersError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    OutputExistsError,
    PathNotAllowedError,
    RecipeError,
    RequestCancelledError,
    UnavailableError,
)

STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [  # first match wins: subclasses first
    (RecipeError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (OutputExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (IncompatibleAdaptersError, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PathNotAllowedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),  # draining, or the engine restarting
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
    (EngineFaultError, grpc.StatusCode.INTERNAL),  # logged with its id by the engine
]


def status_of(error: Exception) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
