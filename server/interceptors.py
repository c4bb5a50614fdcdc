"""What every call passes before a handler sees it: the bearer token, and a request that parses.

grpc answers a request it cannot deserialize (e.g. a string field holding invalid UTF-8) with
UNKNOWN; `DecodeGuard` makes that INVALID_ARGUMENT, which is what it is.
"""

from __future__ import annotations

import hmac

import grpc
from google.protobuf.message import DecodeError

PUBLIC_METHODS = ("/grpc.health.v1.Health/",)  # probes need no token
NO_TOKEN = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
UNPARSABLE = "the request does not parse (a string field must be valid UTF-8)"


def token_matches(metadata, token: str) -> bool:
    """Whether call metadata carries `authorization: Bearer <token>` (compared in constant time)."""
    sent = dict(metadata or ()).get("authorization", "")
    return hmac.compare_digest(sent.encode() if isinstance(sent, str) else bytes(sent), f"Bearer {token}".encode())


def _replace(handler: grpc.RpcMethodHandler, unary, streaming, deserializer=None) -> grpc.RpcMethodHandler:
    """The same method with other behaviours (unary-request methods only: ours all are)."""
    kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return kind(
        streaming if handler.response_streaming else unary,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusal(code: grpc.StatusCode, message: str):
    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # an async generator, like the handler it stands for

    return unary, streaming


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` (health checks excepted); the token
    is compared in constant time."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_METHODS) or handler is None:
            return handler
        if token_matches(details.invocation_metadata, self.token):
            return handler
        return _replace(handler, *_refusal(grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN))


class _Undecodable:
    pass


class DecodeGuard(grpc.aio.ServerInterceptor):
    """A request to `service` that does not parse is INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"  # its handlers are async; health's and reflection's are left alone

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix) or handler.request_streaming:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except (DecodeError, UnicodeDecodeError, ValueError):
                return _Undecodable()

        refuse_unary, refuse_stream = _refusal(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)

        async def unary(request, context):
            if isinstance(request, _Undecodable):
                return await refuse_unary(request, context)
            return await handler.unary_unary(request, context)

        async def streaming(request, context):
            if isinstance(request, _Undecodable):
                async for item in refuse_stream(request, context):
                    yield item
                return
            async for item in handler.unary_stream(request, context):
                yield item

        return _replace(handler, unary, streaming, deserialize)
