"""The persistent adapter store: the source of truth for what clients registered.

Each entry is a PEFT dir holding the adapter and its metadata (`META`), written together by
`atomic_directory`: fsynced, renamed into place, parent fsynced, so an entry is either wholly
there or absent after a crash, and an RPC acknowledges only after that. A delete renames the
entry aside first, so a crash mid-delete never leaves half an entry. `recover()` at startup
removes what a crash left (temp dirs, half-deleted entries), puts back an entry whose replace
was interrupted, and moves any entry that does not parse or validate to `.quarantine/` with
one log line, so a damaged store never stops the server.

Each save gives the entry a fresh id (`ENTRY_KEY` in its metadata): replicas that share a store
(`adapter_fusion.cluster.shared_catalog`) compare it to tell "the same adapter" from "unloaded and
loaded again under the same name".

The store has a quota (`DiskQuota`): its usage is counted by `recover()` and kept up to date by
every save and delete, and a save that would pass it is refused before a byte is written.
Entries are written through the store root's descriptor (`atomic_directory(root=...)`), and
metadata is read with a size and nesting bound (`jsonfile`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from adapter_fusion.adapter_save import saved_bytes, write_adapter_files
from adapter_fusion.adapters import WEIGHTS_NAME, Adapter, load_adapter, read_config
from adapter_fusion.atomic import MARKER_BYTES, atomic_directory, fsync_path, remove_tree, sweep_leftovers, tree_bytes
from adapter_fusion.errors import AdapterFormatError, quoted
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.jsonfile import read_json
from adapter_fusion.names import NAME, check_name
from adapter_fusion.server.quota import DiskQuota

log = logging.getLogger("adapter_fusion.store")
META = "adapter_fusion_store.json"
QUARANTINE = ".quarantine"
ENTRY_KEY = "entry"  # a fresh id per save; not part of AdapterInfo
DEFAULT_QUOTA_BYTES = 10 << 30  # ~2,700 SmolLM2 compositions of 3.7 MB
MAX_META_BYTES = 1 << 20  # metadata is ~1 KB; a bigger file is damage, never read whole


class AdapterStore:
    def __init__(self, root: str | Path, quota_bytes: int = DEFAULT_QUOTA_BYTES, max_meta_bytes: int = MAX_META_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_meta_bytes = max_meta_bytes
        how = "unload adapters (UnloadAdapter) to free room, or restart the server with a larger quota"
        self.quota = DiskQuota("the adapter store", quota_bytes, "--store-quota-mb", how)

    def save(self, adapter: Adapter, info: AdapterInfo) -> str:
        """Write adapter and metadata as one durable entry (replacing a previous one of the name),
        if the quota has room; returns the entry's id."""
        name = check_name(info.name)
        entry = uuid.uuid4().hex
        meta = json.dumps({**asdict(info), ENTRY_KEY: entry}, indent=2).encode()
        with self.quota.claim(saved_bytes(adapter) + len(meta) + MARKER_BYTES, f"storing adapter {quoted(name)}") as claim:
            previous = tree_bytes(self.root / name)
            with atomic_directory(self.root / name, overwrite=True, root=self.root) as tmp:
                write_adapter_files(adapter, tmp)
                (tmp / META).write_bytes(meta)
                written = tree_bytes(tmp) + MARKER_BYTES
            claim.written = written - previous
        return entry

    def read(self, name: str) -> tuple[AdapterInfo, str] | None:
        """An entry's metadata and id, or None if there is no readable entry of that name (the
        factors are not read)."""
        try:
            info, entry = _parse_meta(self.root / check_name(name), self.max_meta_bytes)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return (info, entry) if info.name == name else None

    def names(self) -> list[str]:
        """The entries' names (hidden temp, aside and quarantine dirs excluded)."""
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and NAME.match(p.name))

    def load(self, name: str) -> Adapter:
        return load_adapter(self.root / check_name(name), name=name)

    def delete(self, name: str) -> None:
        entry = self.root / check_name(name)
        if not entry.exists():
            return
        aside = self.root / f".{name}.{uuid.uuid4().hex[:12]}.deleted"
        entry.rename(aside)  # the name is gone at once; a crash now leaves only the aside dir
        fsync_path(self.root)
        size = tree_bytes(aside)
        remove_tree(aside)
        self.quota.freed(size)

    def recover(self) -> list[AdapterInfo]:
        """Repair what a crash left, quarantine what does not validate, and return the entries
        (from metadata only: factors stay on disk until used)."""
        for line in sweep_leftovers(self.root):
            log.info("store: %s", line)
        found, used = [], 0
        for entry in sorted(p for p in self.root.iterdir() if not p.name.startswith(".")):
            try:
                found.append(self._validate(entry))
            except Exception as error:  # noqa: BLE001 (whatever one entry does wrong, the others and the server go on)
                self._quarantine(entry, error)
            else:
                used += tree_bytes(entry)
        self.quota.recount(used)
        return found

    def _validate(self, entry: Path) -> AdapterInfo:
        if not entry.is_dir() or entry.is_symlink():
            raise AdapterFormatError("not an adapter directory")
        info, _ = _parse_meta(entry, self.max_meta_bytes)
        if info.name != entry.name or check_name(info.name) != info.name:
            raise AdapterFormatError(f"metadata names {quoted(str(info.name))}, the directory is {quoted(entry.name)}")
        read_config(entry)
        with safe_open(entry / WEIGHTS_NAME, "pt") as weights:  # the header parses; tensors are read on use
            weights.keys()
        return info

    def _quarantine(self, entry: Path, error: Exception) -> None:
        folder = self.root / QUARANTINE
        folder.mkdir(exist_ok=True)
        aside = folder / f"{entry.name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
        entry.rename(aside)
        fsync_path(self.root)
        log.warning("store: entry %s does not validate (%s: %s); moved to %s", entry.name, type(error).__name__, error, aside)


def _parse_meta(entry: Path, max_bytes: int) -> tuple[AdapterInfo, str]:
    """(info, entry id) from an entry's metadata; an entry written before ids existed gets one
    from its metadata file's mtime, which changes whenever the entry is replaced."""
    meta = read_json(entry / META, max_bytes)
    if not isinstance(meta, dict):
        raise ValueError(f"{META} must hold a JSON object")
    entry_id = meta.pop(ENTRY_KEY, None) or f"mtime-{(entry / META).stat().st_mtime_ns}"
    return AdapterInfo(**meta), str(entry_id)
