"""Compositions as single PEFT dirs, written once per composition into a cache directory: for
engines that apply one LoRA per request (vLLM), where our builtin engine mixes per row.

A weighted mix Σ wᵢΔWᵢ is written exactly, as the concatenated weighted factors (`cat`, rank Σrᵢ);
where Σrᵢ is over the engine's `max_rank`, as the exact low-rank SVD truncation to that rank
(`svd`), whose largest relative error over modules is kept beside it. An entry is keyed by what it
means (the caller's key: the mix and where each source came from), written atomically
(`atomic.atomic_directory`), and reused by every later request; builds of one key run once while
others wait. Its size is checked from the sources' shapes before any arithmetic.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.adapter_save import write_adapter_files
from adapter_fusion.adapters import Adapter
from adapter_fusion.atomic import atomic_directory, is_ours
from adapter_fusion.errors import LimitExceededError
from adapter_fusion.merge import get_method, merge
from adapter_fusion.merge.cost import merge_cost

INFO = "adapter_fusion_mix.json"  # beside the PEFT files: the entry's rank and truncation error


@dataclass(frozen=True)
class CachedMix:
    path: Path  # a PEFT dir any LoRA engine loads
    rank: int
    relative_error: float  # largest over modules; 0.0 when written exactly
    built: bool  # composed by this call (False: found in the cache)


class MixCache:
    def __init__(self, root: str | Path, max_rank: int, max_output_bytes: int = 1 << 30, max_cache_bytes: int = 20 << 30) -> None:
        self.root = Path(root)
        self.max_rank = max_rank  # the engine's largest LoRA rank
        self.max_output_bytes = max_output_bytes  # one entry's factors, float32, checked before composing
        self.max_cache_bytes = max_cache_bytes  # every entry together: past it new entries are refused (an engine may still read old ones)
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (its lock, callers holding or waiting)
        self._guard = threading.Lock()

    def get(self, key: str, sources: Callable[[], Sequence[tuple[Adapter, float]]]) -> CachedMix:
        """The entry for `key` (a file-name-safe hash), composed from `sources()` (called only on a
        miss: loading them is part of the work) if it is not cached yet."""
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                found = self._read(key)
                return found if found is not None else self._build(key, list(sources()))
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]  # no lock kept per key ever asked for
                else:
                    self._locks[key] = (lock, users - 1)

    def _read(self, key: str) -> CachedMix | None:
        entry = self.root / key
        if not entry.is_dir() or entry.is_symlink() or not is_ours(entry):
            return None
        try:
            info = json.loads((entry / INFO).read_text())
            return CachedMix(entry, int(info["rank"]), float(info["relative_error"]), built=False)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged: composed again and replaced

    def _build(self, key: str, sources: list[tuple[Adapter, float]]) -> CachedMix:
        adapters, weights = [a for a, _ in sources], [w for _, w in sources]
        exact = merge_cost(adapters, get_method("cat"), None)
        method, rank = ("cat", None) if exact.max_rank <= self.max_rank else ("svd", self.max_rank)
        cost = exact if method == "cat" else merge_cost(adapters, get_method("svd"), rank)
        if cost.output_bytes > self.max_output_bytes:
            raise LimitExceededError(
                f"the mix would take {cost.output_bytes / 1e6:.1f} MB, over the cache's cap of {self.max_output_bytes / 1e6:.1f} MB per entry"
            )
        held = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file() and not f.is_symlink()) if self.root.is_dir() else 0
        if held + cost.output_bytes > self.max_cache_bytes:
            raise LimitExceededError(
                f"the mix cache {self.root} holds {held / 1e6:.1f} MB of its {self.max_cache_bytes / 1e6:.1f} MB; delete entries no engine uses"
            )
        result = merge(adapters, method, weights, rank=rank, name=key)
        error = max((m.relative_error for m in result.report), default=0.0)
        out_rank = max(result.adapter.ranks.values(), default=0)
        with atomic_directory(self.root / key, overwrite=True) as tmp:  # a damaged entry is replaced whole
            write_adapter_files(result.adapter, tmp)
            (tmp / INFO).write_text(json.dumps({"rank": out_rank, "relative_error": error, "method": method}))
        return CachedMix(self.root / key, out_rank, error, built=True)
