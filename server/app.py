"""Build and run the gRPC server: `create_server(config)` for tests and embedding, `serve(config)`
for the command line (signals, graceful drain)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter_fusion.engine import AdapterInfo, Engine, Limits
from adapter_fusion.adapters import load_adapter
from adapter_fusion.runtime import Runtime
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from server.service import AdapterFusionService, ServiceLimits
from server.store import AdapterStore

log = logging.getLogger("adapter_fusion.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterFusion"].full_name
PUBLIC_METHODS = ("/grpc.health.v1.Health/",)  # probes need no token


@dataclass
class ServerConfig:
    base_dir: Path
    store_dir: Path
    adapter_roots: list[Path] = field(default_factory=list)
    preload: list[Path] = field(default_factory=list)  # adapter dirs registered at start (by dir name)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    limits: Limits = field(default_factory=Limits)
    service_limits: ServiceLimits = field(default_factory=ServiceLimits)
    max_request_bytes: int = 4 << 20
    token: str | None = None  # bearer token required on every call when set
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    grace_seconds: float = 10.0


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_METHODS) or handler is None:
            return handler
        if dict(details.invocation_metadata or ()).get("authorization") == self.expected:
            return handler
        message = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, like the handler it stands for

        kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        return kind(
            deny_stream if handler.response_streaming else deny_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    engine: Engine
    service: AdapterFusionService
    health: health.HealthServicer

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within
        `grace`, then stop. (grpc.aio's own stop(grace) ends in-flight streams at once.)"""
        self.health.enter_graceful_shutdown()
        self.service.draining = True
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        while self.service.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(0)
        self.engine.stop()


async def create_server(config: ServerConfig) -> Running:
    """Load the model and the store, start serving on config.host:config.port (0 = pick one)."""
    options = [("grpc.max_receive_message_length", config.max_request_bytes), ("grpc.so_reuseport", 0)]
    interceptors = [BearerAuth(config.token)] if config.token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)

    store = AdapterStore(config.store_dir)
    runtime = await asyncio.to_thread(Runtime, config.base_dir)
    engine = Engine(runtime, config.limits, reload=store.load)
    for info in store.entries():  # everything registered before a restart, loaded on first use
        engine.register(None, info)
    for directory in config.preload:
        if not engine.has(directory.name):
            adapter = await asyncio.to_thread(load_adapter, directory, directory.name)
            engine.register(adapter, AdapterInfo.of(adapter, str(directory.resolve()), pinned=True))
    engine.start()
    observer = None
    if config.metrics_port is not None:
        from server.metrics import start_metrics

        observer = start_metrics(engine, config.metrics_port, config.host)
    service = AdapterFusionService(engine, store, [Path(r) for r in config.adapter_roots], config.service_limits, observer)
    pb_grpc.add_AdapterFusionServicer_to_server(service, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, engine, service, health_servicer)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    running = await create_server(config)
    scheme = "TLS" if config.tls_cert else "plaintext"
    names = ", ".join(info.name for info, _ in running.engine.adapters()) or "none"
    log.info("adapter-fusion serving %s on %s:%d (%s); adapters: %s", config.base_dir.name, config.host, running.port, scheme, names)
    log.info("try: python examples/grpc_client.py --address %s:%d", config.host, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: finishing in-flight requests for up to %.0f s", config.grace_seconds)
    await running.stop(config.grace_seconds)


class BackgroundServer:
    """A server on its own event loop thread, for tests, examples and benchmarks."""

    def __init__(self, config: ServerConfig) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
        self.thread.start()
        self.running: Running = asyncio.run_coroutine_threadsafe(create_server(config), self.loop).result(timeout=300)
        self.address = f"{config.host}:{self.running.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
