"""One catalog for many replicas: the store directory they all mount is the truth.

Each replica keeps its own registry (what it has loaded) and checks a name against the store
before using it (`sync`): an entry this replica has not seen is registered lazily (its factors
are read on first use), an entry replaced under the same name (a new entry id) replaces the
local one, and a name gone from the store is unregistered here too. Requests in flight keep the
adapter they started with (the registry's references); new ones see the store.

Several processes write one directory, so every write holds file locks (`fcntl.flock`, released
by the kernel if the holder dies): one exclusive lock per adapter name (Load, Compose, Unload,
Export, SearchWeights of a name run one at a time across the cluster) and one per output path,
each together with a shared "maintenance" lock. Repairs after a crash (removing temp dirs,
quarantining, sweeping the write roots) take the maintenance lock exclusively, so a replica that
starts never removes a temp dir another replica is still writing. On several machines the store
must be a shared filesystem whose flock is honoured across clients (NFSv4, CephFS; see the
README); an entry becomes visible by rename, so readers never see half an entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_fusion.adapters import Adapter
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.names import NAME
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.server.catalog import LocalCatalog
from adapter_fusion.server.store import AdapterStore

LOCKS = ".locks"  # hidden: the store's recovery and listing skip it
MAINTENANCE = "maintenance"


@contextmanager
def flocked(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing) across processes; blocks until granted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class SharedCatalog(LocalCatalog):
    shared = True

    def __init__(self, store: AdapterStore, registry: AdapterRegistry, output_roots: Iterable[Path] = ()) -> None:
        super().__init__(store, registry, output_roots)
        self._known: dict[str, str] = {}  # name -> the store entry id this replica registered
        self._lock = threading.Lock()
        self._locks = store.root / LOCKS

    def recover(self) -> None:
        with flocked(self._locks / MAINTENANCE, exclusive=True):  # no other replica is writing now
            self.store.recover()
            self._sweep_outputs()
        self.sync_all()

    def sync(self, names: Iterable[str]) -> None:
        for name in names:
            if not NAME.match(name):  # not a name the store can hold; the service's own check says why
                continue
            stored = self.store.read(name)
            with self._lock:
                self._apply(name, stored)

    def _apply(self, name: str, stored: tuple[AdapterInfo, str] | None) -> None:
        known = self._known.get(name)
        if stored is None:
            if known is not None:  # unloaded elsewhere
                del self._known[name]
                self.registry.discard(name)
            return
        info, entry = stored
        if known == entry:
            return
        self.registry.discard(name)  # an older entry of the name, if any
        self.registry.register(None, info)
        self._known[name] = entry

    def sync_all(self) -> None:
        with self._lock:
            known = set(self._known)
        self.sync(sorted(known | set(self.store.names())))

    @contextmanager
    def writing(self, name: str) -> Iterator[None]:
        with flocked(self._locks / f"name.{name}", exclusive=True), flocked(self._locks / MAINTENANCE, exclusive=False):
            yield

    @contextmanager
    def writing_output(self, path: Path) -> Iterator[None]:
        key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
        with flocked(self._locks / f"output.{key}", exclusive=True), flocked(self._locks / MAINTENANCE, exclusive=False):
            yield

    def persist(self, adapter: Adapter, info: AdapterInfo) -> None:
        entry = self.store.save(adapter, info)
        with self._lock:
            self._known[info.name] = entry

    def delete(self, name: str) -> None:
        self.store.delete(name)
        with self._lock:
            self._known.pop(name, None)
            self.registry.discard(name)
