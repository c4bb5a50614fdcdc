"""What a held adapter is to vLLM: a LoRA id over a PEFT dir this engine wrote.

A registered adapter runs under its registry slot number as its stable LoRA id (written once
while it keeps that slot, removed from vLLM when the registry frees the slot: Unload, eviction).
A weighted mix (`Choice` as a list, or a search group weighted per row) is one LoRA too, with no
merge where exact: `mix_cache.MixCache` writes the concatenated weighted factors (rank Σr), or the
exact SVD truncation to the engine's `max_lora_rank` with its error, once per mix; mixes take ids
above `MIX_IDS` and the least recently used unused ones leave vLLM past `max_mixes`.

Everything here but `take_removed` runs on the engine's preparing threads (disk and merge work);
vLLM itself is touched only on the engine thread, which removes what `take_removed` returns.
A LoRA's dir is removed under the table's lock and never while another thread may hand it out:
each registered adapter's LoRA is written to a dir of its own (never reused), and a mix being
built or read is not dropped until its builder has registered it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
import shutil
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.adapter_save import write_adapter_files
from adapter_fusion.adapters import Adapter
from adapter_fusion.atomic import atomic_directory
from adapter_fusion.entries import Entry, Hold
from adapter_fusion.mix_cache import MixCache
from adapter_fusion.registry import AdapterRegistry

MIX_IDS = 1 << 24  # registry slots stay below; mixes count up from here


@dataclass
class Lora:
    """One LoRA vLLM may load: its id, name and PEFT dir; `users` requests run on it now."""

    lora_id: int
    name: str
    path: Path
    relative_error: float = 0.0  # of a mix truncated to the engine's max rank; 0 when exact
    users: int = 0


class LoraTable:
    def __init__(self, root: Path, max_rank: int, max_mixes: int) -> None:
        self.root = root
        self.mixes = MixCache(root / "mixes", max_rank)
        self.max_mixes = max_mixes
        self._lock = threading.Lock()
        self._slots: dict[int, tuple[Entry, Lora]] = {}  # slot -> the entry it was written for, its LoRA
        self._mixed: OrderedDict[str, Lora] = OrderedDict()  # mix key -> LoRA, least recently used first
        self._removed: list[int] = []  # LoRA ids to remove from vLLM (engine thread)
        self._building: Counter[str] = Counter()  # mix key -> threads between its lookup and its registration
        self._writes = itertools.count()  # each written slot dir gets its own name
        self._serial: weakref.WeakKeyDictionary[Entry, int] = weakref.WeakKeyDictionary()
        self._serials = itertools.count(1)
        self._mix_ids = itertools.count(MIX_IDS)

    def for_hold(self, registry: AdapterRegistry, hold: Hold, row_weights: list[float] | None = None) -> Lora | None:
        """The LoRA a held choice runs as (None: the base model): its adapter's, or a mix's (each
        entry at its weight, or a search group's sources at `row_weights`). May write or compose."""
        if not hold.entries:
            return None
        slots = [registry.slot_for(entry) for entry in hold.entries]  # resident (reloaded), within the budget
        if hold.weights is None and row_weights is None:
            return self.single(slots[0], hold.entries[0])
        if row_weights is not None:
            return self.mix([(hold.entries[0], row_weights)])
        return self.mix([(e, [w] * len(e.sources)) for e, w in zip(hold.entries, hold.weights)])

    def for_rows(self, registry: AdapterRegistry, hold: Hold, row_weights: list[list[float] | None]) -> list[Lora | None]:
        """Each row's LoRA (`for_hold`), all or none: those taken are given back if one fails."""
        loras: list[Lora | None] = []
        try:
            for weights in row_weights:
                loras.append(self.for_hold(registry, hold, weights))
        except Exception:
            for lora in filter(None, loras):
                self.release(lora)
            raise
        return loras

    def single(self, slot: int, entry: Entry) -> Lora:
        """The LoRA of a registered adapter in `slot` (the registry made it resident there)."""
        with self._lock:
            known = self._slots.get(slot)
            if known is not None and known[0] is entry:
                known[1].users += 1
                return known[1]
            path = self.root / "slots" / f"{slot}-{next(self._writes)}"  # its own: removing an old LoRA's dir never touches it
        with atomic_directory(path) as tmp:
            write_adapter_files(entry.sources[0], tmp)
        with self._lock:
            old = self._slots.get(slot)
            if old is not None and old[0] is entry:  # another thread wrote it meanwhile: use that one
                shutil.rmtree(path, ignore_errors=True)
                old[1].users += 1
                return old[1]
            if old is not None:  # the slot went to another entry: drop the old LoRA
                self._forget(old[1])
            lora = Lora(slot, f"{entry.info.name}@{slot}", path, users=1)
            self._slots[slot] = (entry, lora)
            return lora

    def mix(self, parts: list[tuple[Entry, list[float]]]) -> Lora:
        """The LoRA of Σ weight x source over these entries' sources (each entry with one weight per source)."""
        key = hashlib.sha256(repr([(self._serial_of(e), [float(w) for w in ws]) for e, ws in parts]).encode()).hexdigest()[:32]
        with self._lock:
            found = self._mixed.get(key)
            if found is not None:
                self._mixed.move_to_end(key)
                found.users += 1
                return found
            self._building[key] += 1  # its dir is not removed until this thread registers it
        sources: list[tuple[Adapter, float]] = [(a, w) for e, ws in parts for a, w in zip(e.sources, ws)]
        try:
            cached = self.mixes.get(key, lambda: sources)
        except BaseException:
            with self._lock:
                self._done_building(key)
            raise
        with self._lock:
            self._done_building(key)
            found = self._mixed.get(key)  # another thread built the same mix meanwhile
            if found is None:
                found = Lora(next(self._mix_ids), f"mix-{key[:12]}", cached.path, cached.relative_error)
                self._mixed[key] = found
            found.users += 1
            self._trim()
            return found

    def release(self, lora: Lora) -> None:
        with self._lock:
            lora.users -= 1
            self._trim()

    def slot_freed(self, slot: int) -> None:
        """The registry freed `slot` (Unload, eviction): its LoRA leaves vLLM."""
        with self._lock:
            old = self._slots.get(slot)
            if old is not None and old[1].users == 0:  # in use: a stale notice, its entry is back (no slot a request holds is freed)
                del self._slots[slot]
                self._forget(old[1])

    def take_removed(self) -> list[int]:
        with self._lock:
            removed, self._removed = self._removed, []
            return removed

    def _serial_of(self, entry: Entry) -> int:
        """A number no other entry ever gets (names are reused; ids of objects are too)."""
        with self._lock:  # callers hold no lock when they ask
            if entry not in self._serial:
                self._serial[entry] = next(self._serials)
            return self._serial[entry]

    def _done_building(self, key: str) -> None:  # lock held
        self._building[key] -= 1
        if not self._building[key]:
            del self._building[key]

    def _trim(self) -> None:  # lock held
        unused = [key for key, lora in self._mixed.items() if lora.users == 0 and key not in self._building]
        for key in unused[: max(0, len(self._mixed) - self.max_mixes)]:
            self._forget(self._mixed.pop(key))

    def _forget(self, lora: Lora) -> None:  # lock held
        """Out of vLLM (on the engine thread's next round) and off the disk."""
        self._removed.append(lora.lora_id)
        shutil.rmtree(lora.path, ignore_errors=True)
