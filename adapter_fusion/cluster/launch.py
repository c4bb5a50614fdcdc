"""Start (or join) a Ray cluster and deploy adapter-fusion on it as one Ray Serve application:
`Ingress` (no model, the target of Ray Serve's gRPC proxy) in front of N `Replica`s (a server
core each). The gRPC proxy listens on `port` on every node, on all interfaces, in plaintext, so
a token (or `insecure`) is required, as for a non-loopback `adapter-fusion serve`.
"""

from __future__ import annotations

import logging
import os

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from adapter_fusion.cluster.ingress import Ingress
from adapter_fusion.cluster.proxy_servicers import SERVICER_FUNCTIONS
from adapter_fusion.cluster.replica import Replica
from adapter_fusion.cluster.cluster_settings import MESSAGE_CAP, AppArgs, ClusterConfig, check

log = logging.getLogger("adapter_fusion.cluster")


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


def app_builder(args: dict) -> serve.Application:
    """The application from a Serve config file: `import_path: adapter_fusion.cluster.launch:app_builder`.
    `args` are `AppArgs` (every serving option of `adapter-fusion serve` that applies to a replica);
    the config's own `grpc_options` must name `proxy_servicers.SERVICER_FUNCTIONS` (see examples/kuberay/)."""
    settings = AppArgs.model_validate(args).model_copy(update={"token": os.environ.get("ADAPTER_FUSION_TOKEN") or None})
    return build_app(settings.cluster_config())
