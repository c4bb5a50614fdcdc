"""The memory budget of resident adapters: their factors plus the slot buffers built from them.

When a change goes over it, the least recently used adapters that nothing needs are dropped first
(unpinned and unused; reloadable from the store, or, when never stored, gone with their name);
when it still does not fit, the change is refused. The registry (`adapter_fusion.registry`) owns
the entries and calls this under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from adapter_fusion.entries import Entry
from adapter_fusion.errors import LimitExceededError
from adapter_fusion.slot_numbers import SlotNumbers, SlotTable


class MemoryBudget:
    def __init__(self, limit_bytes: int, slot_bytes: Callable[[SlotTable], int], can_reload: bool) -> None:
        self.limit_bytes = limit_bytes
        self.slot_bytes = slot_bytes  # what a slot table costs once stacked into buffers
        self.can_reload = can_reload

    def usage(self, entries: Iterable[Entry], slots: SlotNumbers) -> int:
        factors = sum(e.info.size_bytes for e in entries if e.sources is not None)
        return factors + self.slot_bytes(slots.table())

    def droppable(self, entry: Entry) -> bool:
        """Nothing needs its factors now, and they can be read again or were never stored."""
        return not (entry.info.pinned or entry.refs > 0 or (entry.persisted and not self.can_reload))

    def enforce(self, entries: dict[str, Entry], slots: SlotNumbers, drop: Callable[[Entry], None], keep: Entry | None = None) -> None:
        """`drop` resident entries, least recently used first (never `keep`), until the budget holds."""
        usage = self.usage(entries.values(), slots)
        resident = [e for e in entries.values() if e.sources is not None]
        for entry in sorted(resident, key=lambda e: e.last_used):
            if usage <= self.limit_bytes:
                return
            if entry is keep or not self.droppable(entry):
                continue
            drop(entry)
            usage = self.usage(entries.values(), slots)
        if usage > self.limit_bytes:
            raise LimitExceededError(
                f"resident adapters and their slot buffers need {usage / 1e6:.1f} MB, over the memory budget of "
                f"{self.limit_bytes / 1e6:.1f} MB, and nothing can be evicted (pinned or in use)"
            )
