"""Start (or join) a Ray cluster and deploy adapter-fusion on it as one Ray Serve application:
`Ingress` (no model, the target of Ray Serve's gRPC proxy) in front of N `Replica`s (a server
core each). The gRPC proxy listens on `port` on every node, on all interfaces, in plaintext, so
a token (or `insecure`) is required, as for a non-loopback `adapter-fusion serve`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.config import gRPCOptions

from adapter_fusion.cluster.ingress import Ingress
from adapter_fusion.cluster.proxy_servicers import SERVICER_FUNCTIONS
from adapter_fusion.cluster.replica import Replica
from adapter_fusion.errors import InvalidRequestError
from adapter_fusion.limits import Limits
from adapter_fusion.server.app import ServerConfig, check_exposure

log = logging.getLogger("adapter_fusion.cluster")
APP_NAME = "adapter-fusion"
MESSAGE_CAP = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # read by Ray Serve's gRPC proxy at start


@dataclass
class ClusterConfig:
    server: ServerConfig  # what every replica serves; store_dir must be one directory every node sees
    replicas: int = 2
    address: str | None = None  # None: start a Ray instance here; "auto" or "ray://host:10001": join that cluster
    port: int = 50051  # Ray Serve's gRPC proxy, on every node
    http_port: int = 8000  # Ray Serve always runs an HTTP proxy too (on 127.0.0.1); nothing of ours is served there
    app_name: str = APP_NAME
    adapters_per_replica: int = 8  # keys Ray's multiplexing keeps resident per replica (LRU)
    cpus_per_replica: float = 1.0  # Ray CPUs each replica reserves (torch uses that many threads)
    ingress_replicas: int = 1
    max_ongoing_requests: int = 64  # per replica; its engine batches up to limits.max_batch of them at once
    health_check_period_s: float = 2.0  # how soon Ray notices a replica whose engine gave up
    num_cpus: int | None = None  # CPUs of a Ray instance started here (None: all)


def check(config: ClusterConfig) -> None:
    """Refuse settings that cannot work, before Ray starts."""
    if config.replicas < 1 or config.ingress_replicas < 1:
        raise InvalidRequestError("replicas and ingress replicas must be at least 1")
    if config.adapters_per_replica < 1:
        raise InvalidRequestError("adapters per replica must be at least 1")
    if config.server.tls_cert or config.server.tls_key:
        raise InvalidRequestError("Ray Serve's gRPC proxy serves plaintext only: terminate TLS in front of it (a load balancer or an ingress)")
    check_exposure(dataclasses.replace(config.server, host="0.0.0.0"))  # the proxy listens on every interface


def build_app(config: ClusterConfig) -> serve.Application:
    replica = serve.deployment(
        Replica,
        name="Replica",
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=config.server.grace_seconds,
    )
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.max_ongoing_requests * config.replicas,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(config.server, config.adapters_per_replica), config.server.token)


def deploy(config: ClusterConfig, **init_options) -> bool:
    """Deploy (or update) the application and return when every replica serves. Starts Ray here
    (`ray.init(**init_options)`) unless Ray is already initialised or `config.address` names a
    cluster; returns whether it did. Ray's gRPC proxy takes its request size cap from its
    environment: set here from `max_request_bytes` when Ray starts here, else set
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on the nodes (Ray's default is 2 GiB)."""
    check(config)
    started = False
    if not ray.is_initialized():
        started = config.address is None
        if started:
            os.environ[MESSAGE_CAP] = str(config.server.max_request_bytes)  # inherited by the proxy actors
        ray.init(address=config.address, num_cpus=config.num_cpus if started else None, include_dashboard=False, **init_options)
    serve.start(
        grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
        http_options={"host": "127.0.0.1", "port": config.http_port},
    )
    serve.run(build_app(config), name=config.app_name)
    log.info("adapter-fusion: %d replica(s) serving on port %d (Ray Serve application %r)", config.replicas, config.port, config.app_name)
    return started


def undeploy(config: ClusterConfig, started: bool) -> None:
    """Remove the application (draining its replicas); stop Ray too if `deploy` started it."""
    serve.delete(config.app_name)
    if started:
        serve.shutdown()
        ray.shutdown()


class AppArgs(BaseModel):
    """`args` of the application in a Serve config file (e.g. KubeRay's `serveConfigV2`); unknown
    keys are errors. The token is read from $ADAPTER_FUSION_TOKEN (a Kubernetes Secret), never
    from the file."""

    model_config = ConfigDict(extra="forbid")
    base: Path
    store: Path  # on a volume every pod mounts (ReadWriteMany)
    adapter_roots: list[Path] = []
    output_roots: list[Path] = []
    preload: list[Path] = []
    replicas: int = 2
    adapters_per_replica: int = 8
    cpus_per_replica: float = 1.0
    max_new_tokens: int = 512
    memory_budget_mb: int = 1024
    insecure: bool = False


def app_builder(args: dict) -> serve.Application:
    """The application from a Serve config file: `import_path: adapter_fusion.cluster.launch:app_builder`.
    The config's own `grpc_options` must name `proxy_servicers.SERVICER_FUNCTIONS` (see examples/kuberay/)."""
    a = AppArgs.model_validate(args)
    limits = Limits(max_new_tokens=a.max_new_tokens, default_new_tokens=min(64, a.max_new_tokens), memory_budget_bytes=a.memory_budget_mb << 20)
    server = ServerConfig(
        base_dir=a.base,
        store_dir=a.store,
        adapter_roots=a.adapter_roots,
        output_roots=a.output_roots,
        preload=a.preload,
        limits=limits,
        token=os.environ.get("ADAPTER_FUSION_TOKEN") or None,
        insecure=a.insecure,
    )
    config = ClusterConfig(server, a.replicas, adapters_per_replica=a.adapters_per_replica, cpus_per_replica=a.cpus_per_replica)
    check(config)
    return build_app(config)
