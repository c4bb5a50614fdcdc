"""The shared catalog's file locks, without Ray: two catalogs on one store (as two replicas have)
exclude each other through real `flock`s on separate open files, as two processes would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from adapter_fusion.adapters import load_adapter
from adapter_fusion.cluster.shared_catalog import SharedCatalog
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.server.store import AdapterStore

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def runtime(tok_base: Path) -> Runtime:
    return Runtime(tok_base)


def replica(runtime: Runtime, root: Path, outputs: Path) -> SharedCatalog:
    """What one replica holds of the catalog: its own registry over the shared store."""
    store = AdapterStore(root)
    return SharedCatalog(store, AdapterRegistry(runtime.check, runtime.slot_bytes, 1 << 30, store.load), [outputs])


def blocked(work) -> threading.Thread:
    """Start `work` in a thread and check it is still waiting 0.3 s later."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "it should be waiting for a lock"
    return thread


def test_recovery_waits_for_writers_before_removing_temp_dirs(runtime: Runtime, tmp_path: Path) -> None:
    a, b = replica(runtime, tmp_path / "store", tmp_path / "out"), replica(runtime, tmp_path / "store", tmp_path / "out")
    writing = tmp_path / "store" / ".upper.abcd1234.tmp"  # what atomic_directory writes into before its rename
    exporting = tmp_path / "out" / ".export.abcd1234.tmp"
    with a.writing("upper"), a.writing_output(tmp_path / "out" / "export"):
        writing.mkdir()
        exporting.mkdir(parents=True)
        starting = blocked(b.recover)  # another replica starting up
        assert writing.is_dir() and exporting.is_dir()
    starting.join(timeout=10)
    assert not writing.exists() and not exporting.exists()  # swept once no write was in progress


def test_one_writer_per_name_across_replicas(runtime: Runtime, tok_adapters: list[Path], tmp_path: Path) -> None:
    a, b = replica(runtime, tmp_path / "store", tmp_path / "out"), replica(runtime, tmp_path / "store", tmp_path / "out")
    adapter = load_adapter(tok_adapters[0], "alpha")
    with a.writing("alpha"):
        with b.writing("beta"):  # another name: no wait
            pass

        def take() -> None:
            with b.writing("alpha"):
                pass

        waiting = blocked(take)
        a.registry.register(adapter, AdapterInfo.of(adapter, "one", pinned=False))
        a.persist(adapter, AdapterInfo.of(adapter, "one", pinned=False))
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    b.sync(["alpha"])  # what b sees once it holds the name: a's entry, registered lazily
    assert b.registry.info("alpha").source == "one" and b.registry.listing() == [(b.registry.info("alpha"), False)]


def test_evicting_keeps_pinned_and_in_use_adapters(runtime: Runtime, tok_adapters: list[Path], tmp_path: Path) -> None:
    """What a replica does when Ray's multiplexing drops a key: the factors go, unless pinned or
    in use, and come back from the store on the next use (one more load)."""
    catalog = replica(runtime, tmp_path / "store", tmp_path / "out")
    registry = catalog.registry
    for path, pinned in zip(tok_adapters[:2], (False, True)):
        adapter = load_adapter(path, path.name)
        info = AdapterInfo.of(adapter, str(path), pinned)
        registry.register(adapter, info)
        catalog.persist(adapter, info)
    held = registry.hold("alpha")
    assert not registry.evict("alpha")  # in use
    registry.release(held)
    assert registry.evict("alpha") and not registry.evict("beta")  # pinned stays
    loads = registry.stats["loads"]
    assert registry.get("alpha").name == "alpha" and registry.stats["loads"] == loads + 1
