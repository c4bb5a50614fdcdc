"""What a cluster deployment is told, without Ray: the serving options every replica applies
(`ServingSettings`, the same as `adapter-fusion serve`'s) plus the replicas and their resources
(`ReplicaSetSettings`: KubeRay's `app_builder` args are `AppArgs`), plus where Ray and its proxy
run (`ClusterSettings`: `adapter-fusion cluster`). Not here: the standalone server's listener
(host, TLS, metrics, connection limits): Ray Serve's proxy holds the connections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from adapter_fusion.errors import InvalidRequestError
from adapter_fusion.server.settings import ServingSettings, envvar

MESSAGE_CAP = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # read by Ray Serve's gRPC proxy at start

if TYPE_CHECKING:
    from adapter_fusion.server.app import ServerConfig

APP_NAME = "adapter-fusion"


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
    from adapter_fusion.server.app import check_exposure  # here: building the command's options loads no torch

    if config.replicas < 1 or config.ingress_replicas < 1:
        raise InvalidRequestError("replicas and ingress replicas must be at least 1")
    if config.adapters_per_replica < 1:
        raise InvalidRequestError("adapters per replica must be at least 1")
    if config.server.tls_cert or config.server.tls_key:
        raise InvalidRequestError("Ray Serve's gRPC proxy serves plaintext only: terminate TLS in front of it (a load balancer or an ingress)")
    check_exposure(dataclasses.replace(config.server, host="0.0.0.0"))  # the proxy listens on every interface


class ReplicaSetSettings(ServingSettings):
    """The serving options plus the replicas of one Ray Serve application and what each reserves.
    (`replicas` and `adapters_per_replica` are checked by `check`, with the messages it gives.)"""

    replicas: int = Field(2, description="replicas, each a server core on its own base model copy")
    adapters_per_replica: int = Field(8, description="adapters (routing keys) each replica keeps resident; Ray routes by them")
    cpus_per_replica: float = Field(1.0, ge=0, description="Ray CPUs each replica reserves")

    def proxy(self) -> dict[str, Any]:
        """The `ClusterConfig` fields of Ray and its proxy these settings set (none: a Serve config file sets them)."""
        return {}

    def cluster_config(self) -> ClusterConfig:
        """Checked (`check`) before the default base model is found, which may convert it (~25 s)."""
        config = ClusterConfig(
            self.core_config(local=False),
            self.replicas,
            adapters_per_replica=self.adapters_per_replica,
            cpus_per_replica=self.cpus_per_replica,
            **self.proxy(),
        )
        check(config)
        config.server.base_dir = self.base_dir().resolve()
        return config


class AppArgs(ReplicaSetSettings):
    """`args` of the application in a Serve config file (e.g. KubeRay's `serveConfigV2`); unknown
    keys are errors. The token is read from $ADAPTER_FUSION_TOKEN (a Kubernetes Secret), never
    from the file."""

    base: Path = Field(description="base model dir every pod reads")
    store: Path = Field(description="the adapter store, on a volume every pod mounts (ReadWriteMany)")
    adapter_roots: list[Path] = Field(default_factory=list, description="directories LoadAdapter may read from (on a volume every pod mounts); default: none")
    output_roots: list[Path] = Field(default_factory=list, description="directories ExportAdapter/BakeModel may write into; default: none (both refused)")

    @model_validator(mode="before")
    @classmethod
    def _not_from_the_file(cls, args: Any) -> Any:
        if isinstance(args, dict) and "token" in args:
            raise ValueError("token: set $ADAPTER_FUSION_TOKEN (from a Secret), never the token in the config file")
        if isinstance(args, dict) and "max_request_mb" in args:
            raise ValueError(f"max_request_mb: Ray Serve's gRPC proxy reads its cap from {MESSAGE_CAP} on every node: set it there (in bytes)")
        return args


class ClusterSettings(ReplicaSetSettings):
    """`adapter-fusion cluster`: a Ray cluster started (or joined) here, its proxy's ports."""

    address: str | None = Field(None, description="join this Ray cluster ('auto', 'ray://host:10001'); default: start Ray here")
    port: int = Field(
        50051, ge=0, le=65535, description="gRPC port of Ray Serve's proxy, on every node and interface", json_schema_extra=envvar("ADAPTER_FUSION_PORT")
    )
    http_port: int = Field(8000, ge=0, le=65535, description="Ray Serve's HTTP proxy (on 127.0.0.1; unused by adapter-fusion)")

    @model_validator(mode="after")
    def _cap_reaches_the_proxy(self) -> ClusterSettings:
        if self.address is not None and self.max_request_mb != type(self).model_fields["max_request_mb"].default:
            raise ValueError(f"--max-request-mb: a Ray cluster joined with --address has its proxy's cap from {MESSAGE_CAP} on every node: set it there (in bytes)")
        return self

    def proxy(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "http_port": self.http_port}
