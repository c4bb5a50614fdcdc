"""The adapter store survives crashes: an entry is whole or absent, leftovers are repaired at
start, and an entry that does not validate is quarantined instead of stopping the server."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from adapter_fusion import load_adapter
from adapter_fusion import atomic
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.server.store import META, QUARANTINE, AdapterStore

DEMO = Path(__file__).parent.parent / "examples" / "adapters"


@pytest.fixture()
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def _save(store: AdapterStore, name: str, source: str = "uppercase") -> AdapterInfo:
    adapter = load_adapter(DEMO / source, name)
    info = AdapterInfo.of(adapter, str(DEMO / source), pinned=False)
    store.save(adapter, info)
    return info


def test_save_writes_adapter_and_metadata_together(store: AdapterStore) -> None:
    info = _save(store, "upper")
    entry = store.root / "upper"
    assert json.loads((entry / META).read_text())["name"] == "upper" and atomic.is_ours(entry)
    assert store.recover() == [info]
    assert store.load("upper").modules.keys() == load_adapter(DEMO / "uppercase").modules.keys()
    assert [p.name for p in store.root.iterdir()] == ["upper"]  # no temp dir left behind


def test_metadata_is_written_before_the_entry_becomes_visible(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the adapter's files but before the metadata must leave no entry at all."""
    real_dump = json.dumps

    def crash(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("name") == "upper":
            raise KeyboardInterrupt  # stands for a kill between the two writes
        return real_dump(obj, *args, **kwargs)

    monkeypatch.setattr("adapter_fusion.server.store.json.dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(store, "upper")
    assert not (store.root / "upper").exists()
    assert store.recover() == []


def test_every_file_and_directory_is_fsynced_before_the_rename(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files and dirs are fsynced through descriptors: record which inodes, in what order."""
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    _save(store, "upper")
    entry = store.root / "upper"
    inodes = {p.stat().st_ino for p in entry.iterdir()} | {entry.stat().st_ino}
    assert inodes <= set(synced) and META in {p.name for p in entry.iterdir()}  # every file and the entry dir
    assert synced[-1] == store.root.stat().st_ino  # and then the parent, after the rename


def test_recover_repairs_what_a_crash_left(store: AdapterStore) -> None:
    kept = _save(store, "kept")
    _save(store, "replaced")
    (store.root / ".half.abc123.tmp").mkdir()  # a write killed before its rename
    (store.root / ".half.abc123.tmp" / "adapter_config.json").write_text("{")
    (store.root / "replaced").rename(store.root / ".replaced.0123456789ab.old")  # killed between the renames of a replace
    (store.root / ".gone.0123456789ab.deleted").mkdir()  # killed in the middle of a delete
    infos = store.recover()
    assert sorted(i.name for i in infos) == ["kept", "replaced"] and kept in infos
    assert sorted(p.name for p in store.root.iterdir()) == ["kept", "replaced"]
    assert store.load("replaced").modules


def test_delete_is_a_rename_first(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(store, "upper")
    monkeypatch.setattr("adapter_fusion.server.store.remove_tree", lambda path: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the rename, before the files are gone
        store.delete("upper")
    assert not (store.root / "upper").exists()
    monkeypatch.undo()
    assert store.recover() == [] and list(store.root.iterdir()) == []


@pytest.mark.parametrize(
    "damage",
    ["half-written metadata", "metadata of another name", "no metadata", "no weights", "truncated weights", "a stray file", "unknown metadata key"],
)
def test_entries_that_do_not_validate_are_quarantined(store: AdapterStore, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    good = _save(store, "good")
    _save(store, "bad")
    bad = store.root / "bad"
    if damage == "half-written metadata":
        (bad / META).write_text((bad / META).read_text()[:40])
    elif damage == "metadata of another name":
        (bad / META).write_text(json.dumps({**json.loads((bad / META).read_text()), "name": "good"}))
    elif damage == "no metadata":
        (bad / META).unlink()
    elif damage == "no weights":
        (bad / "adapter_model.safetensors").unlink()
    elif damage == "truncated weights":
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "a stray file":
        atomic.remove_tree(bad)
        bad.write_text("not a directory")
    elif damage == "unknown metadata key":
        (bad / META).write_text(json.dumps({**json.loads((bad / META).read_text()), "colour": "red"}))
    with caplog.at_level(logging.WARNING, logger="adapter_fusion.store"):
        assert store.recover() == [good]  # the server starts with what is whole
    assert store.recover() == [good]  # and the next start finds nothing left to move
    quarantined = list((store.root / QUARANTINE).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("bad.")
    assert sum("does not validate" in r.message for r in caplog.records) == 1  # one log line per entry


def test_quota_usage_is_counted_at_start_and_kept_by_saves_and_deletes(store: AdapterStore) -> None:
    _save(store, "upper")
    _save(store, "other")
    on_disk = atomic.tree_bytes(store.root)
    assert store.quota.used == on_disk  # every byte written, the marker included
    _save(store, "upper")  # a replace counts its difference, not twice
    assert store.quota.used == atomic.tree_bytes(store.root)
    store.delete("other")
    assert store.quota.used == atomic.tree_bytes(store.root) < on_disk
    restarted = AdapterStore(store.root, quota_bytes=store.quota.limit)
    restarted.recover()
    assert restarted.quota.used == atomic.tree_bytes(store.root)
