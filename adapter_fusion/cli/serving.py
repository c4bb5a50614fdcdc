"""The serving commands, their options made from the settings models: `serve` (one server) and
`cluster` (replicas on Ray Serve)."""

from __future__ import annotations

import logging

from adapter_fusion.cli.output import console, fail
from adapter_fusion.cluster.cluster_settings import ClusterSettings
from adapter_fusion.errors import AdapterFusionError
from adapter_fusion.server.settings import ServeSettings


def serve(settings: ServeSettings) -> None:
    """Serve the gRPC API: one base model, hot-loaded and composed adapters, mixed batches, on our
    engine or on vLLM (--engine vllm)."""
    import asyncio

    from adapter_fusion.server.app import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(run_server(settings.server_config()))
    except AdapterFusionError as error:
        fail(error)


def cluster(settings: ClusterSettings) -> None:
    """Serve the same gRPC API from N replicas on a Ray cluster (needs the `cluster` extra). Every
    serving option of `serve` applies to each replica; not here, as Ray Serve's proxy holds the
    connections: --host (it listens on every interface), --tls-cert/--tls-key (terminate TLS in
    front of it), --metrics-port (Ray exports its own) and the connection limits."""
    import signal
    import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from adapter_fusion.cluster.launch import deploy, undeploy
    except ImportError as error:
        fail(RuntimeError(f"the cluster command needs Ray Serve: pip install 'adapter-fusion[cluster]' ({error})"))
    try:
        config = settings.cluster_config()  # refusals before the base model is converted or Ray starts
        started = deploy(config)
    except AdapterFusionError as error:
        fail(error)
    console.print(f"adapter-fusion cluster: {config.replicas} replica(s) on port {config.port}; Ctrl-C stops it")
    stopping: list[int] = []  # a handler may only append here: it runs between bytecodes of this loop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    while not stopping:
        time.sleep(0.5)
    console.print("stopping: draining the replicas")
    undeploy(config, started)
