"""Adapter writes: a name registered and persisted to the store together (taken back if the store
refuses), names brought up to date with the catalog (the shared store on a cluster), and a name's
info as the API reports it."""

from __future__ import annotations

from adapter_fusion.adapters import Adapter
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.errors import NotFoundError
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.catalog import LocalCatalog
from adapter_fusion.server.store import AdapterStore


def info_message(info: AdapterInfo, resident: bool) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=info.name,
        rank=info.rank,
        target_modules=info.target_modules,
        size_bytes=info.size_bytes,
        source=info.source,
        pinned=info.pinned,
        resident=resident,
        base_model=info.base_model or "",
    )


class AdapterWrites:
    def __init__(self, registry: AdapterRegistry, catalog: LocalCatalog, store: AdapterStore) -> None:
        self.registry, self.catalog, self.store = registry, catalog, store

    def info(self, name: str) -> pb.AdapterInfo:
        for info, resident in self.registry.listing(include_hidden=True):
            if info.name == name:
                return info_message(info, resident)
        raise NotFoundError(f"adapter {name!r} was unloaded while this call ran")

    def persist(self, adapter: Adapter, info: AdapterInfo) -> None:
        """Write a just-registered adapter to the store (durably); if that fails, take the name back."""
        try:
            self.catalog.persist(adapter, info)
        except BaseException:
            self.registry.unregister(info.name)
            raise

    def register_new(self, adapter: Adapter, info: AdapterInfo) -> None:
        """Register and persist a new name (ALREADY_EXISTS if it was taken meanwhile)."""
        with self.catalog.writing(info.name):
            self.catalog.sync([info.name])
            self.registry.register(adapter, info)
            self.persist(adapter, info)

    async def synced(self, names: list[str]) -> None:
        """Bring these names up to date with the catalog (reads the shared store on a cluster)."""
        if self.catalog.shared:
            await in_thread(self.catalog.sync, names)
