"""What the registry keeps per name (`adapter_fusion.registry`): the public `AdapterInfo`, the
`Entry` with its factors, references and slot, and the `Hold` a request keeps on its entries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from adapter_fusion.adapters import Adapter

Choice = str | Sequence[tuple[str, float]] | None  # an adapter, a weighted mix of loaded adapters (no merge), or the base model
@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    source: str  # where it came from: a path, or the canonical recipe it was composed from
    pinned: bool
    base_model: str | None

    @staticmethod
    def of(adapter: Adapter, source: str, pinned: bool) -> AdapterInfo:
        ranks = adapter.ranks.values()
        return AdapterInfo(adapter.name, max(ranks, default=0), adapter.target_names, adapter.size_bytes, source, pinned, adapter.base_model)


@dataclass(eq=False)
class Entry:
    info: AdapterInfo
    sources: list[Adapter] | None  # one adapter, or a group weighted per row; None: evicted
    hidden: bool = False  # inline compositions and search groups: usable, not listed
    persisted: bool = True  # in the store, so it can be evicted and reloaded; else evicting drops it
    inline: bool = False  # an inline composition (hidden, never stored): counted against the inline cap
    refs: int = 0
    slot: int | None = None
    removed: bool = False
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Hold:
    """What one request holds: its entries and, for a mix, each one's weight."""

    entries: tuple[Entry, ...]
    weights: tuple[float, ...] | None = None  # None: one adapter (or none) used as it is
