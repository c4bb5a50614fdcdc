"""Prometheus metrics on an optional HTTP port: RPCs, latency, time to first token, and the
engine's own counters (tokens, faults, queue depth, batch size, adapter loads and evictions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.server.calls import Observer


class _EngineCollector:
    def __init__(self, engine: ServingEngine, registry: AdapterRegistry) -> None:
        self.engine, self.registry = engine, registry

    def collect(self):
        stats, registry = self.engine.stats, self.registry
        yield CounterMetricFamily("adapter_fusion_generated_tokens", "Tokens generated", value=stats["tokens"])
        yield CounterMetricFamily("adapter_fusion_engine_faults", "Faults of the engine thread (each ended the requests it held)", value=stats["faults"])
        yield CounterMetricFamily("adapter_fusion_adapter_loads", "Adapter factors loaded into memory", value=registry.stats["loads"])
        yield CounterMetricFamily("adapter_fusion_adapter_evictions", "Adapters evicted under the memory budget", value=registry.stats["evictions"])
        yield GaugeMetricFamily("adapter_fusion_batch_size", "Rows in the running batch", value=stats["batch_size"])
        yield GaugeMetricFamily("adapter_fusion_queue_depth", "Requests waiting to join the batch", value=self.engine.queue_depth)
        resident = sum(1 for _, r in registry.listing(include_hidden=True) if r)
        yield GaugeMetricFamily("adapter_fusion_resident_adapters", "Adapters with factors in memory", value=resident)


def start_metrics(engine: ServingEngine, registry: AdapterRegistry, port: int, host: str = "127.0.0.1") -> Observer:
    """Serve /metrics on `port` and return the observer the service reports RPCs to."""
    adapters, registry = registry, CollectorRegistry()
    registry.register(_EngineCollector(engine, adapters))
    rpcs = Counter("adapter_fusion_rpcs", "RPCs by method and status code", ["method", "code"], registry=registry)
    latency = Histogram("adapter_fusion_rpc_seconds", "RPC duration", ["method"], registry=registry)
    ttft = Histogram("adapter_fusion_time_to_first_token_seconds", "Generate: time to first token", registry=registry)
    start_http_server(port, addr=host, registry=registry)

    def rpc_done(method: str, code: str, seconds: float) -> None:
        rpcs.labels(method, code).inc()
        latency.labels(method).observe(seconds)

    return Observer(rpc_done=rpc_done, first_token=ttft.observe)
