"""The residency policy: the one owner of what stays in memory. It decides every drop of an
entry's factors (the memory budget, the count cap on inline compositions, an eviction asked for
by a cluster replica when Ray's multiplexing LRU lets a key go) and the registry
(`adapter_fusion.registry`) applies it under its lock, in its own methods: nothing else changes
an entry's residency.

Memory: the factors of resident adapters plus the slot buffers built from them. When a change
goes over the budget, the least recently used adapters that nothing needs are dropped first
(unpinned and unused; reloadable from the store, or, when never stored, gone with their name);
when it still does not fit, the change is refused. A pinned adapter counts with the slot it will
need when served, from the moment it is pinned: a pin that could never be served is refused when
it is made, not at its first request.

Inline compositions (hidden, never stored, keyed by their recipe's hash): at most `inline_cap`
(the service's `inline_cache_size`) of them are kept, least recently used dropped first. Neither
rule ever drops an entry a request holds: the cap is met again when its last request ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from adapter_fusion.entries import Entry
from adapter_fusion.errors import LimitExceededError
from adapter_fusion.slot_numbers import SlotNumbers, SlotTable


class ResidencyPolicy:
    def __init__(self, limit_bytes: int, slot_bytes: Callable[[SlotTable], int], can_reload: bool) -> None:
        self.limit_bytes = limit_bytes
        self.slot_bytes = slot_bytes  # what a slot table costs once stacked into buffers
        self.can_reload = can_reload
        self.inline_cap: int | None = None  # set by the service that composes them (its inline_cache_size); None: no cap

    def usage(self, entries: Iterable[Entry], slots: SlotNumbers) -> int:
        """Resident factors, plus the slot buffers of every assigned slot and of the slot each
        pinned adapter not in one yet will take."""
        entries = list(entries)
        factors = sum(e.info.size_bytes for e in entries if e.sources is not None)
        pinned = [e.sources for e in entries if e.info.pinned and e.slot is None and e.sources is not None]
        return factors + self.slot_bytes(slots.table() + pinned)

    def check_servable(self, entries: Iterable[Entry], entry: Entry) -> None:
        """Refuse an adapter that could never be served: its factors and slot beside every pinned
        one's would not fit, whatever else were evicted."""
        pinned = [e for e in entries if e.info.pinned and e.sources is not None and e is not entry]
        need = entry.info.size_bytes + sum(e.info.size_bytes for e in pinned)
        need += self.slot_bytes([e.sources for e in pinned] + [entry.sources or []])
        if need > self.limit_bytes:
            what = "beside the pinned adapters" if pinned else "on its own"
            raise LimitExceededError(
                f"adapter {entry.info.name!r} could never be served: with its slot buffers it needs {need / 1e6:.1f} MB {what}, "
                f"over the memory budget of {self.limit_bytes / 1e6:.1f} MB; unpin or unload adapters, or raise the budget"
            )

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

    def over_inline_cap(self, entries: Iterable[Entry]) -> list[Entry]:
        """The inline compositions to drop so that at most `inline_cap` are kept: least recently
        used first, none that a request holds (fewer, then, until it ends)."""
        if self.inline_cap is None:
            return []
        inline = [e for e in entries if e.inline]
        excess = len(inline) - self.inline_cap
        unheld = sorted((e for e in inline if e.refs == 0), key=lambda e: e.last_used)
        return unheld[: max(excess, 0)]
