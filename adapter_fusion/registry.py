"""The adapter registry: names, pins, references, residency within the memory budget, reloads
from the store.

Any thread may call it. Its lock guards only bookkeeping and is never held while the store is
read or slots are written, so a caller on an event loop never waits behind disk or model work.

Residency: an adapter's factors stay in memory while it is pinned, in use, or within the memory
budget; inline compositions, also within their count cap (`adapter_fusion.residency`, the policy:
least recently used ones are dropped first, stored ones reloaded on demand). Every change to an
entry (register, unregister, hold, release, reload, evict, an inline composition added or
dropped, a drop under the budget) is one of this class's methods under its lock. A request holds
a reference to the entry it resolved, so unloading or evicting never changes what an in-flight
request computes: the slot is freed when its last request ends, and the policy never drops a held
entry.
Under this lock, `adapter_fusion.slot_numbers` keeps the slot numbers; `adapter_fusion.entries`
says what each name holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from adapter_fusion.adapters import Adapter
from adapter_fusion.entries import AdapterInfo, Choice, Entry, Hold
from adapter_fusion.errors import AlreadyExistsError, InvalidRequestError, LimitExceededError, NotFoundError, quoted
from adapter_fusion.residency import ResidencyPolicy
from adapter_fusion.slot_numbers import SlotNumbers, SlotTable
from adapter_fusion.slots import Route


def _not_loaded(name: str) -> NotFoundError:
    return NotFoundError(f"no adapter named {quoted(name)} is loaded; call LoadAdapter first")


class AdapterRegistry:
    def __init__(
        self,
        check: Callable[[Adapter], None],
        slot_bytes: Callable[[SlotTable], int],
        budget_bytes: int,
        reload: Callable[[str], Adapter] | None = None,
    ) -> None:
        self.check = check  # refuses adapters the model cannot run
        self.policy = ResidencyPolicy(budget_bytes, slot_bytes, can_reload=reload is not None)
        self._reload = reload  # read only here: the policy was told at construction whether it exists
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._slots = SlotNumbers()
        self.stats = {"loads": 0, "evictions": 0}

    # ---- names --------------------------------------------------------------------------------

    def register(self, adapter: Adapter | None, info: AdapterInfo) -> AdapterInfo:
        """Add a name; the same name from the same source again is a no-op. `adapter=None`
        registers it lazily (read from the store on first use)."""
        if adapter is not None:
            self.check(adapter)
        with self._lock:
            current = self._entries.get(info.name)
            if current is not None:
                if current.info.source == info.source:
                    return current.info
                raise AlreadyExistsError(f"adapter {quoted(info.name)} already exists from another source; unload it first or pick another name")
            if adapter is None:
                self._entries[info.name] = Entry(info, None)
            else:
                self._admit(Entry(info, [adapter]))
                self.stats["loads"] += 1
        return info

    def register_group(self, name: str, adapters: list[Adapter]) -> None:
        """A hidden, pinned slot holding several adapters whose weights each request row sets:
        LoraHub's candidates without a merge per candidate. It shares its sources' factors, so
        only its slot buffers count against the budget."""
        for adapter in adapters:
            self.check(adapter)
        rank = max(max(a.ranks.values(), default=0) for a in adapters)
        info = AdapterInfo(name, rank, [], 0, "group", True, None)
        with self._lock:
            if name in self._entries:
                raise AlreadyExistsError(f"adapter {quoted(name)} already exists")
            self._admit(Entry(info, list(adapters), hidden=True, persisted=False))

    def hold_inline(self, name: str) -> Hold | None:
        """The inline composition registered as `name`, held for one request (and now its most
        recently used); None if there is none (never composed, or dropped): compose it."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not entry.inline:
                return None
            self._take(entry)
        return Hold((entry,))

    def add_inline(self, adapter: Adapter, info: AdapterInfo) -> Hold:
        """Register an inline composition and hold it for the request that composed it, in one
        step: no budget check or cap can drop it before that request runs. One already registered
        under the name (composed meanwhile) is held instead. Refused whole if it cannot fit."""
        self.check(adapter)
        with self._lock:
            entry = self._entries.get(info.name)
            if entry is None:
                entry = Entry(info, [adapter], hidden=True, persisted=False, inline=True, refs=1)
                self._admit(entry)
                self.stats["loads"] += 1
                self._cap_inline()
            elif entry.inline:
                self._take(entry)
            else:
                raise AlreadyExistsError(f"adapter {quoted(info.name)} already exists and is not an inline composition")
        return Hold((entry,))

    def cap_inline(self, count: int) -> None:
        """Keep at most `count` inline compositions (the service's cap), least recently used dropped."""
        with self._lock:
            self.policy.inline_cap = count
            self._cap_inline()

    def unregister(self, name: str) -> None:
        if not self.discard(name):
            raise _not_loaded(name)

    def discard(self, name: str) -> bool:
        """Unregister `name` if it is registered; whether it was. Requests holding it keep it
        (and its slot) until they end."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return False
            self._forget(entry)
            return True

    def evict(self, name: str) -> bool:
        """Drop a resident adapter's factors now (they are reloaded from the store on next use),
        unless it is pinned, in use or not in the store: a cluster replica keeps resident what
        Ray Serve routes to it, not more. Whether it was evicted."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.sources is None or not entry.persisted or not self.policy.droppable(entry):
                return False
            self._drop(entry)
            return True

    def listing(self, include_hidden: bool = False) -> list[tuple[AdapterInfo, bool]]:
        """(info, resident) for every registered name."""
        with self._lock:
            return [(e.info, e.sources is not None) for e in self._entries.values() if include_hidden or not e.hidden]

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._entry(name).info

    def get(self, name: str) -> Adapter:
        """The adapter's factors, e.g. to compose or export it. May read the store: call it off
        any event loop."""
        with self._lock:
            entry = self._entry(name)
        sources = self._resident(entry)
        if len(sources) != 1:
            raise InvalidRequestError(f"{quoted(name)} is a group of adapters, not one adapter")
        return sources[0]

    # ---- references and slots -----------------------------------------------------------------

    def hold(self, choice: Choice) -> Hold:
        """Hold an adapter, every adapter of a mix, or nothing (the base model) for one request;
        nothing is held if a name is missing."""
        if choice is None:
            return Hold(())
        names, weights = ([choice], None) if isinstance(choice, str) else ([n for n, _ in choice], tuple(float(w) for _, w in choice))
        if weights is not None and not names:
            raise InvalidRequestError("a mix needs at least one adapter")
        with self._lock:
            entries = tuple(self._entry(name) for name in names)
            for entry in entries:
                self._take(entry)
        return Hold(entries, weights)

    def held(self, target: Choice | Hold) -> Hold:
        """A caller's hold as it is (the caller hands it over), or a new hold on a choice."""
        return target if isinstance(target, Hold) else self.hold(target)

    def release(self, hold: Hold) -> None:
        with self._lock:
            for entry in hold.entries:
                entry.refs -= 1
                entry.last_used = time.monotonic()  # used until now
                if entry.refs == 0 and entry.removed:
                    self._slots.free(entry)
            if any(entry.inline and entry.refs == 0 for entry in hold.entries):
                self._cap_inline()  # an inline composition the cap had to keep while held

    def route_for(self, hold: Hold) -> Route:
        """The slot (or mix of slots) a held request runs in, each made resident on first use."""
        slots = [self.slot_for(entry) for entry in hold.entries]
        if hold.weights is None:
            return slots[0] if slots else 0
        return tuple((slot, (w,) * len(e.sources)) for slot, e, w in zip(slots, hold.entries, hold.weights))

    def slot_for(self, entry: Entry) -> int:
        """The slot a held entry runs in, assigned (and the budget checked) on first use."""
        self._resident(entry)
        with self._lock:
            if entry.slot is None:
                self._slots.assign(entry)
                self._fit(undo=lambda: self._slots.free(entry), keep=entry)
            return entry.slot

    def take_slot_changes(self) -> list[tuple[int, list[Adapter] | None]]:
        """(slot, its sources, or None: free it) for each slot changed since the last call."""
        with self._lock:
            return self._slots.take_changes()

    def invalidate_slots(self) -> None:
        """The model's slot buffers are in an unknown state (a fault): write every slot again."""
        with self._lock:
            self._slots.invalidate()

    # ---- residency (lock held unless said) ----------------------------------------------------

    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise _not_loaded(name)
        return entry

    def _resident(self, entry: Entry) -> list[Adapter]:
        """Its sources, read from the store (without the lock) if evicted."""
        with self._lock:
            if entry.sources is not None:
                entry.last_used = time.monotonic()
                return entry.sources
            if self._reload is None or not entry.persisted:
                raise NotFoundError(f"adapter {quoted(entry.info.name)} was evicted and there is no store to reload it from")
        loaded = [self._reload(entry.info.name)]  # two threads may both read it: harmless
        with self._lock:
            if entry.sources is None:
                entry.sources = loaded
                self.stats["loads"] += 1
                self._fit(undo=lambda: setattr(entry, "sources", None), keep=entry)
            entry.last_used = time.monotonic()
            return entry.sources

    def _take(self, entry: Entry) -> None:
        entry.refs += 1
        entry.last_used = time.monotonic()

    def _admit(self, entry: Entry) -> None:
        """Register a resident entry within the memory budget, or refuse it whole (also when it
        could never be served beside the pinned ones)."""
        self.policy.check_servable(self._entries.values(), entry)
        self._entries[entry.info.name] = entry
        # one with no copy in the store is refused rather than evicted as it arrives (its name would go)
        self._fit(undo=lambda: self._entries.pop(entry.info.name), keep=None if entry.persisted else entry)

    def _fit(self, undo: Callable[[], object], keep: Entry | None = None) -> None:
        """Enforce the budget after a change; if it cannot hold, undo that change and refuse."""
        try:
            self.policy.enforce(self._entries, self._slots, self._drop, keep)
        except LimitExceededError:
            undo()
            raise

    def _cap_inline(self) -> None:
        for entry in self.policy.over_inline_cap(self._entries.values()):
            self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        """Unregister its name; requests holding it keep it (and its slot) until they end."""
        del self._entries[entry.info.name]
        entry.removed = True
        if entry.refs == 0:
            self._slots.free(entry)

    def _drop(self, entry: Entry) -> None:
        """Evict its factors (and its slot); a name never stored goes with them (an inline
        composition is composed again on its next request)."""
        entry.sources = None
        self._slots.free(entry)
        if not entry.persisted:
            self._forget(entry)
        self.stats["evictions"] += 1
