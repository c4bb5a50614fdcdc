"""Who decides which adapter names exist: `LocalCatalog` for one server, where the registry in
memory is the truth and the store its durable copy. A cluster shares one store among many
replicas and makes the store the truth (`adapter_fusion.cluster.shared_catalog.SharedCatalog`); the
service calls the same hooks either way, and here they cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_fusion.adapters import Adapter, load_adapter
from adapter_fusion.atomic import sweep_leftovers
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.server.store import AdapterStore

log = logging.getLogger("adapter_fusion.server")


class LocalCatalog:
    shared = False  # True: other processes write the same store; names must be checked against it

    def __init__(self, store: AdapterStore, registry: AdapterRegistry, output_roots: Iterable[Path] = ()) -> None:
        self.store = store
        self.registry = registry
        self.output_roots = [Path(root) for root in output_roots]

    def recover(self) -> None:
        """Repair the store and the write roots after a crash, and register what the store holds
        (factors are read on first use)."""
        for info in self.store.recover():
            self.registry.register(None, info)
        self._sweep_outputs()

    def _sweep_outputs(self) -> None:
        for root in self.output_roots:  # a killed export or bake left only hidden temp dirs
            root.mkdir(parents=True, exist_ok=True)
            for line in sweep_leftovers(root):
                log.info("output root %s: %s", root, line)

    def preload(self, directories: Iterable[Path]) -> None:
        """Register adapter dirs given at start, pinned, under their directory names."""
        for directory in directories:
            with self.writing(directory.name):
                self.sync([directory.name])
                if not self.registry.has(directory.name):
                    adapter = load_adapter(directory, directory.name)
                    info = AdapterInfo.of(adapter, str(directory.resolve()), pinned=True)
                    self.registry.register(adapter, info)
                    if self.shared:  # every replica must see it, so it goes into the shared store
                        self.persist(adapter, info)

    # ---- hooks the service calls (in worker threads) ----------------------------------------------

    def sync(self, names: Iterable[str]) -> None:
        """Make these names in the registry agree with the catalog before they are used."""

    def sync_all(self) -> None:
        """Make every name agree (before listing)."""

    @contextmanager
    def writing(self, name: str) -> Iterator[None]:
        """Held while a name is created, replaced, removed or exported (one process: the
        service's own per-name lock already orders them)."""
        yield

    @contextmanager
    def writing_output(self, path: Path) -> Iterator[None]:
        """Held while an output directory is written."""
        yield

    def persist(self, adapter: Adapter, info: AdapterInfo) -> None:
        self.store.save(adapter, info)

    def delete(self, name: str) -> None:
        """Remove a name: the store first, so a crash after it cannot bring the name back."""
        self.store.delete(name)
        self.registry.unregister(name)
