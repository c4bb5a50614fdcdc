"""One replica of the cluster: today's server core (runtime + engine + service) on its own base
model copy, called by the ingress through a Ray Serve handle instead of by grpc.

Residency follows routing: Generate and Score pass through a `@serve.multiplexed` loader keyed
like the client's `multiplexed_model_id` (`routing.routing_key`), so Ray Serve learns which
replica holds which adapter and routes the next request for it there. The loader reads the
adapter's factors from the shared store in a worker thread (not on the engine thread, which would
stall every stream), and when Ray's per-replica LRU drops a key its adapters are evicted here too
(unless used by a key still held) through `registry.evict`, whose residency policy keeps one pinned
or in use, so "resident" means the same thing to Ray's router and to the registry.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from ray import serve

from adapter_fusion.cluster.shared_catalog import SharedCatalog
from adapter_fusion.routing import RECIPE_PREFIX, adapters_of, routing_key
from adapter_fusion.cluster.wire import ReplicaTag, RpcFailure
from adapter_fusion.errors import AdapterFusionError
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.app import ServerConfig, build_core

METHODS = set(pb.DESCRIPTOR.services_by_name["AdapterFusion"].methods_by_name)
ROUTED = {"Generate", "Score"}  # the RPCs that run an adapter, and so are multiplexed


class ForwardedContext:
    """The part of a grpc context the service uses, for a call forwarded by the ingress: an abort
    becomes an `RpcFailure` the ingress turns back into the same status on the wire."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RpcFailure(code.name, details)


class Residency:
    """What Ray's multiplexing LRU holds per key; Ray calls `__del__` when it drops the key."""

    def __init__(self, key: str, release: Callable[[str], None]) -> None:
        self.key, self._release, self._released = key, release, False

    def __del__(self) -> None:  # Ray calls it on LRU eviction, the garbage collector again later
        if not self._released:
            self._released = True
            self._release(self.key)


class Replica:
    async def __init__(self, config: ServerConfig, adapters_per_replica: int) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.core = await build_core(config, on_state=lambda state: None, catalog_class=SharedCatalog)
        self.core.engine.start()
        self.registry = self.core.service.registry
        self.context = ForwardedContext()
        self._names: dict[str, list[str]] = {}  # key -> its adapters, for keys held or being loaded
        self._names_lock = threading.Lock()  # Ray releases keys from a worker thread

        async def resident(key: str) -> Residency:
            return await self._load(key)

        self._resident = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(resident)

    # ---- calls from the ingress -------------------------------------------------------------------

    async def unary(self, method: str, request: Any) -> tuple[Any, ReplicaTag]:
        await self._route(method, request)
        message = await getattr(self.core.service, method)(request, self.context)
        return message, self._tag()

    async def stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        """The tag first (just before the first message: the adapter is loaded by then), then the messages."""
        await self._route(method, request)
        tagged = False
        async for message in getattr(self.core.service, method)(request, self.context):
            if not tagged:
                tagged = True
                yield self._tag()
            yield message

    def health(self) -> str:
        """The engine's state: serving, restarting, failed, stopped."""
        return self.core.engine.state

    def check_health(self) -> None:
        """Ray Serve's periodic probe: an engine that gave up gets this replica replaced."""
        if self.core.engine.state == "failed":
            raise RuntimeError("the engine failed repeatedly; this replica must be replaced")

    def __del__(self) -> None:  # Ray Serve calls it after draining, on shutdown or scale-down
        core = getattr(self, "core", None)
        if core is not None:
            core.engine.stop()

    # ---- residency ----------------------------------------------------------------------------------

    def _tag(self) -> ReplicaTag:
        return ReplicaTag(self.replica_id, self.registry.stats["loads"])

    async def _route(self, method: str, request: Any) -> None:
        if method not in METHODS:
            raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED.name, f"no method {method[:64]!r}")
        key = routing_key(request) if method in ROUTED else ""
        if key:
            with self._names_lock:
                self._names.setdefault(key, adapters_of(request))
            await self._resident(key)

    async def _load(self, key: str) -> Residency:
        with self._names_lock:  # (a key dropped between its request's _route and here: an adapter key names itself)
            names = self._names.setdefault(key, [] if key.startswith(RECIPE_PREFIX) else [key])
        await in_thread(self._warm, list(names))
        return Residency(key, self._release)

    def _warm(self, names: list[str]) -> None:
        """Read the adapters' factors now; a name that fails here fails in the request itself, with its own error."""
        self.core.service.catalog.sync(names)
        for name in names:
            try:
                self.registry.get(name)
            except AdapterFusionError:
                pass

    def _release(self, key: str) -> None:
        with self._names_lock:
            names = self._names.pop(key, [])
            still = {name for held in self._names.values() for name in held}
        for name in set(names) - still:
            self.registry.evict(name)
