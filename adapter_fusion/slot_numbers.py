"""Which registry entry each slot number holds, and which numbers changed since the engine last
wrote the runtime's slot buffers (`slots.SlotBank`), so it writes those and only those. Slot 0
is the base model; a freed number is reused first. The registry's lock guards every call."""

from __future__ import annotations

from adapter_fusion.adapters import Adapter
from adapter_fusion.entries import Entry

SlotTable = list[list[Adapter]]  # slot i + 1 holds table[i]: its sources' factors, side by side


class SlotNumbers:
    def __init__(self) -> None:
        self._slots: list[Entry | None] = []  # slot i + 1 holds _slots[i]
        self._changed: set[int] = set()

    def assign(self, entry: Entry) -> int:
        """Give `entry` the lowest free number."""
        free = next((i for i, e in enumerate(self._slots) if e is None), len(self._slots))
        if free == len(self._slots):
            self._slots.append(None)
        self._slots[free], entry.slot = entry, free + 1
        self._changed.add(entry.slot)
        return entry.slot

    def free(self, entry: Entry) -> None:
        if entry.slot is not None:
            self._slots[entry.slot - 1] = None
            self._changed.add(entry.slot)
            entry.slot = None

    def take_changes(self) -> list[tuple[int, list[Adapter] | None]]:
        """(slot, its sources, or None: free it) for each slot changed since the last call."""
        changes = [(slot, self._slots[slot - 1].sources if self._slots[slot - 1] is not None else None) for slot in sorted(self._changed)]
        self._changed.clear()
        return changes

    def invalidate(self) -> None:
        """Every slot counts as changed (the buffers are in an unknown state after a fault)."""
        self._changed = set(range(1, len(self._slots) + 1))

    def table(self) -> SlotTable:
        """Each slot's resident sources (empty where free), to size the buffers."""
        return [e.sources if e is not None and e.sources is not None else [] for e in self._slots]
