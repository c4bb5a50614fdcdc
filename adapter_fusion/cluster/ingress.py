"""The cluster's front door: the deployment Ray Serve's gRPC proxy hands every
`adapter_fusion.v1.AdapterFusion` and `grpc.health.v1.Health` call to (by method name).

It holds no model. It checks the token and that the request parsed, then forwards the call to a
replica through a Ray Serve handle carrying the client's `multiplexed_model_id` (so Ray routes it
to a replica that has the adapter), and turns the outcome into what a single server would answer:
the replica's status code and message, its id in the trailing metadata, and UNAVAILABLE (not
Ray's INTERNAL "actor died") when the replica went away mid-call. A call that changes nothing
(Generate before its first message, Score, ListAdapters) is then retried once, on another
replica; one that may have changed the catalog (Load, Compose, Unload, Export, Bake,
SearchWeights) is not, so the client decides.

A direct proxy -> replica path would save this hop, but Ray's proxy reports a dead replica as
INTERNAL and offers no hook to change that; the hop costs a few hundred microseconds per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from adapter_fusion.cluster.proxy_servicers import Undecodable
from adapter_fusion.cluster.wire import ReplicaTag, RpcFailure
from adapter_fusion.errors import new_error_id
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.calls import MAX_DETAILS
from adapter_fusion.server.interceptors import NO_TOKEN, UNPARSABLE, token_matches

log = logging.getLogger("adapter_fusion.cluster")
SERVICE = pb.DESCRIPTOR.services_by_name["AdapterFusion"]
HEALTH_TIMEOUT_S = 5.0

# method -> retried once on another replica when its replica died before answering (it changed nothing)
UNARY = {"LoadAdapter": False, "UnloadAdapter": False, "ListAdapters": True, "ComposeAdapter": False, "Score": True, "ExportAdapter": False}
STREAMING = {"Generate": True, "BakeModel": False, "SearchWeights": False}  # Generate: only before its first message
if {m.name: m.server_streaming for m in SERVICE.methods} != {**dict.fromkeys(UNARY, False), **dict.fromkeys(STREAMING, True)}:
    raise RuntimeError("UNARY and STREAMING must list every method of the AdapterFusion service as the proto declares it")


def failure_of(error: BaseException) -> RpcFailure:
    """The status a client sees for what a forwarded call raised."""
    for candidate in (getattr(error, "cause", None), error):  # a replica's own exception arrives as a RayTaskError's cause
        if isinstance(candidate, RpcFailure):
            return RpcFailure(candidate.code, candidate.details)
    if isinstance(error, (RayActorError, ReplicaUnavailableError)):
        return RpcFailure("UNAVAILABLE", "the replica serving this call stopped before it finished; retry (another replica takes it)", True)
    if isinstance(error, DeploymentUnavailableError):
        return RpcFailure("UNAVAILABLE", "no replica of the cluster is running; retry shortly")
    if isinstance(error, BackPressureError):
        return RpcFailure("RESOURCE_EXHAUSTED", "every replica's queue is full; retry later")
    error_id = new_error_id()
    log.error("internal error (error id %s)", error_id, exc_info=error)
    return RpcFailure("INTERNAL", f"internal error (error id {error_id}); the server log has the details")


def _fail(grpc_context: RayServegRPCContext, failure: RpcFailure) -> RpcFailure:
    """Set the call's status (Ray's proxy sends it when the method raises); returns what to raise."""
    details = failure.details if len(failure.details) <= MAX_DETAILS else failure.details[: MAX_DETAILS - 3] + "..."
    grpc_context.set_code(grpc.StatusCode[failure.code])
    grpc_context.set_details(details)
    return failure


class Ingress:
    def __init__(self, replicas: DeploymentHandle, token: str | None = None) -> None:
        self.replicas = replicas
        self.token = token

    def _admit(self, request: Any, grpc_context: RayServegRPCContext) -> None:
        if self.token is not None and not token_matches(grpc_context.invocation_metadata(), self.token):
            raise _fail(grpc_context, RpcFailure("UNAUTHENTICATED", NO_TOKEN))
        if isinstance(request, Undecodable):
            raise _fail(grpc_context, RpcFailure("INVALID_ARGUMENT", UNPARSABLE))

    def _handle(self, grpc_context: RayServegRPCContext, stream: bool) -> DeploymentHandle:
        return self.replicas.options(stream=stream, multiplexed_model_id=grpc_context.multiplexed_model_id() or "")

    async def forward(self, method: str, request: Any, grpc_context: RayServegRPCContext, retry: bool) -> Any:
        self._admit(request, grpc_context)
        for attempt in (1, 2):
            try:
                message, tag = await self._handle(grpc_context, stream=False).unary.remote(method, request)
            except Exception as error:
                failure = failure_of(error)
                if failure.replica_died and retry and attempt == 1:
                    continue
                raise _fail(grpc_context, failure) from None
            grpc_context.set_trailing_metadata(tag.metadata())
            return message

    async def forward_stream(self, method: str, request: Any, grpc_context: RayServegRPCContext, retry: bool) -> AsyncIterator[Any]:
        self._admit(request, grpc_context)
        for attempt in (1, 2):
            sent = False
            try:
                async for item in self._handle(grpc_context, stream=True).stream.remote(method, request):
                    if isinstance(item, ReplicaTag):  # set before the messages: Ray's proxy sends the context of the last one
                        grpc_context.set_trailing_metadata(item.metadata())
                        continue
                    sent = True
                    yield item
                return
            except Exception as error:
                failure = failure_of(error)
                if failure.replica_died and retry and attempt == 1 and not sent:
                    continue
                raise _fail(grpc_context, failure) from None

    # ---- grpc.health.v1 (no token needed, as on one server) ---------------------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """SERVING when a replica answers that its engine serves (Ray routes the probe to one replica;
        Ray Serve itself replaces replicas that fail its own health checks)."""
        if request.service not in ("", SERVICE.full_name):
            raise _fail(grpc_context, RpcFailure("NOT_FOUND", f"unknown service {request.service[:64]!r}"))
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def List(self, request: health_pb2.HealthListRequest, grpc_context: RayServegRPCContext) -> health_pb2.HealthListResponse:
        status = health_pb2.HealthCheckResponse(status=await self._status())
        return health_pb2.HealthListResponse(statuses={"": status, SERVICE.full_name: status})

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
        raise _fail(grpc_context, RpcFailure("UNIMPLEMENTED", "Watch is not served by the cluster; poll Check"))
        yield  # an async generator: the proxy streams this method

    async def _status(self) -> int:
        try:
            state = await asyncio.wait_for(self.replicas.options(stream=False).health.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # no replica answered in time
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING if state == "serving" else health_pb2.HealthCheckResponse.NOT_SERVING


def _unary_rpc(method: str, retry: bool):
    async def rpc(self: Ingress, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self.forward(method, request, grpc_context, retry)

    rpc.__name__ = rpc.__qualname__ = method
    return rpc


def _streaming_rpc(method: str, retry: bool):
    async def rpc(self: Ingress, request: Any, grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
        async for message in self.forward_stream(method, request, grpc_context, retry):
            yield message

    rpc.__name__ = rpc.__qualname__ = method
    return rpc


for _method, _retry in UNARY.items():  # one forwarding method per RPC: Ray's proxy calls them by name
    setattr(Ingress, _method, _unary_rpc(_method, _retry))
for _method, _retry in STREAMING.items():
    setattr(Ingress, _method, _streaming_rpc(_method, _retry))
