"""What Ray Serve's gRPC proxy serves (`gRPCOptions.grpc_servicer_functions` names these).

The proxy calls each function with a placeholder servicer and routes every method it registers
to the application's ingress deployment, method by method name. Two services:

* `adapter_fusion.v1.AdapterFusion`, whose requests parse tolerantly: bytes that do not parse
  (e.g. a string field holding invalid UTF-8) reach the ingress as `Undecodable`, which answers
  INVALID_ARGUMENT as a single server does (grpc itself would fail the call with another code).
* `grpc.health.v1.Health` (Check and List answered by the ingress; see `ingress.Ingress.Check`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc

ADAPTER_FUSION = f"{__name__}.add_adapter_fusion"
HEALTH = f"{health_pb2_grpc.__name__}.add_HealthServicer_to_server"
SERVICER_FUNCTIONS = [ADAPTER_FUSION, HEALTH]


class Undecodable:
    """Stands for a request message that did not parse."""


def _tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return Undecodable()

    return deserialize


class _TolerantRegistration:
    """Passed to the generated `add_..._to_server` in place of the server: registers the same
    handlers with tolerant request parsers. The generated function hands the same handlers to
    both registration calls, so the generic one is built here from the registered one."""

    def __init__(self, server: grpc.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # built in add_registered_method_handlers from the same handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        tolerant = {name: h._replace(request_deserializer=_tolerant(h.request_deserializer)) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, tolerant),))
        self.server.add_registered_method_handlers(service, tolerant)


def add_adapter_fusion(servicer: object, server: grpc.Server) -> None:
    """`add_AdapterFusionServicer_to_server` with tolerant request parsing."""
    pb_grpc.add_AdapterFusionServicer_to_server(servicer, _TolerantRegistration(server))
