"""The serving engine: one thread owns the model; adapters are named, resident on demand, batched.

Handlers (any thread) register adapters and submit requests; the engine thread admits waiting
requests at step boundaries into one mixed-adapter batch (`runtime.Decoder`), runs other model
work (scoring) between steps, and hands tokens back through each request's callback.

Residency: an adapter's factors stay in memory while it is pinned, in use, or within the memory
budget (least recently used unpinned ones are evicted first, and reloaded on demand through
`reload`). A request holds a reference to the entry it resolved, so unloading or evicting never
changes what an in-flight request computes: the slot is freed when its last request ends.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from adapter_fusion.adapters import Adapter
from adapter_fusion.errors import AlreadyExistsError, InvalidRequestError, LimitExceededError, NotFoundError
from adapter_fusion.runtime import Decoder, Request, Runtime


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 512  # cap on a request's max_new_tokens
    default_new_tokens: int = 64  # used when a request leaves it 0
    max_prompt_tokens: int = 2048
    max_queue: int = 256  # requests waiting to join the batch
    max_batch: int = 32  # rows decoded together
    memory_budget_bytes: int = 1 << 30  # resident adapter factors


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    target_modules: list[str]
    size_bytes: int
    source: str
    pinned: bool
    base_model: str | None

    @staticmethod
    def of(adapter: Adapter, source: str, pinned: bool) -> AdapterInfo:
        ranks = adapter.ranks.values()
        return AdapterInfo(adapter.name, max(ranks, default=0), adapter.target_names, adapter.size_bytes, source, pinned, adapter.base_model)


@dataclass(eq=False)
class _Entry:
    info: AdapterInfo
    sources: list[Adapter] | None  # one adapter, or a group weighted per row; None: evicted
    hidden: bool = False  # inline compositions and search groups: usable, not listed
    refs: int = 0
    slot: int | None = None
    removed: bool = False
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Event:
    """What a request's callback receives: new text/tokens, and on the last event the end."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


@dataclass(eq=False)
class _Pending:
    request: Request
    entry: _Entry | None
    emit: Callable[[Event], None]
    sent_text: int = 0
    sent_ids: int = 0


def _holdback(text: str, stops: list[str]) -> int:
    """How much of `text` is safe to stream: not a possible start of a stop string, no broken UTF-8."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


class Engine:
    def __init__(self, runtime: Runtime, limits: Limits = Limits(), reload: Callable[[str], Adapter] | None = None) -> None:
        self.runtime = runtime
        self.limits = limits
        self.reload = reload
        self.decoder = Decoder(runtime)
        self._entries: dict[str, _Entry] = {}
        self._slots: list[_Entry | None] = []  # slot i + 1 holds _slots[i]
        self._dirty = False
        self._waiting: deque[_Pending] = deque()
        self._jobs: list[Callable[[], None]] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="adapter-fusion-engine", daemon=True)
        self.stats = {"tokens": 0, "requests": 0, "loads": 0, "evictions": 0, "batch_size": 0}

    # ---- registry (any thread) ---------------------------------------------------------------

    def register(self, adapter: Adapter | None, info: AdapterInfo, hidden: bool = False) -> AdapterInfo:
        """Add a name. `adapter=None` registers it lazily (loaded through `reload` on first use)."""
        if adapter is not None:
            self.runtime.check(adapter)
        with self._lock:
            current = self._entries.get(info.name)
            if current is not None:
                if current.info.source == info.source:
                    return current.info
                raise AlreadyExistsError(
                    f"adapter {info.name!r} is already loaded from {current.info.source}; unload it first or pick another name"
                )
            if adapter is None:
                self._entries[info.name] = _Entry(info, None, hidden)
            else:
                self._admit(_Entry(info, [adapter], hidden))
                self.stats["loads"] += 1
        return info

    def register_group(self, name: str, adapters: list[Adapter]) -> None:
        """A hidden, pinned slot holding several adapters whose weights each request row sets
        (`score(..., source_weights=...)`): LoraHub's candidates without a merge per candidate."""
        for adapter in adapters:
            self.runtime.check(adapter)
        size = sum(a.size_bytes for a in adapters)
        info = AdapterInfo(name, max(max(a.ranks.values(), default=0) for a in adapters), [], size, "group", True, None)
        with self._lock:
            if name in self._entries:
                raise AlreadyExistsError(f"adapter {name!r} already exists")
            self._admit(_Entry(info, list(adapters), hidden=True))

    def unregister(self, name: str) -> None:
        with self._lock:
            entry = self._entry(name)
            del self._entries[name]
            entry.removed = True
            if entry.refs == 0:
                self._release_slot(entry)

    def adapters(self, include_hidden: bool = False) -> list[tuple[AdapterInfo, bool]]:
        """(info, resident) for every registered name."""
        with self._lock:
            return [(e.info, e.sources is not None) for e in self._entries.values() if include_hidden or not e.hidden]

    def get(self, name: str) -> Adapter:
        """The adapter's factors (reloaded if evicted), e.g. to compose or export it."""
        with self._lock:
            entry = self._entry(name)
            self._make_resident(entry)
            entry.last_used = time.monotonic()
            if len(entry.sources) != 1:  # type: ignore[arg-type]
                raise InvalidRequestError(f"{name!r} is a group of adapters, not one adapter")
            return entry.sources[0]  # type: ignore[index]

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    # ---- requests (any thread) ---------------------------------------------------------------

    def submit(self, request: Request, adapter: str | None, emit: Callable[[Event], None]) -> Request:
        """Queue a generation; tokens arrive through `emit` (called on the engine thread)."""
        self._validate(request)
        with self._lock:
            if len(self._waiting) >= self.limits.max_queue:
                raise LimitExceededError(f"the queue is full ({self.limits.max_queue} waiting requests); retry later")
            entry = self._acquire(adapter)
            self._waiting.append(_Pending(request, entry, emit))
            self.stats["requests"] += 1
            self._lock.notify()
        return request

    def _validate(self, request: Request) -> None:
        if not request.prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(request.prompt_ids) > self.limits.max_prompt_tokens:
            raise LimitExceededError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is {self.limits.max_prompt_tokens}")
        if request.max_new_tokens == 0:
            request.max_new_tokens = self.limits.default_new_tokens
        if request.max_new_tokens > self.limits.max_new_tokens:
            raise LimitExceededError(f"max_new_tokens {request.max_new_tokens} is over the limit of {self.limits.max_new_tokens}")
        if not (request.temperature >= 0 and request.temperature <= 100):
            raise InvalidRequestError(f"temperature must be in [0, 100], got {request.temperature}")
        if not (0 < request.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1] (0 is read as 1), got {request.top_p}")
        if request.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {request.top_k}")

    def score(
        self, adapter: str | None, prompts: list[list[int]], targets: list[list[int]], source_weights: torch.Tensor | None = None
    ) -> Future:
        """Summed target NLL per example (a tensor), computed on the engine thread between steps;
        `source_weights` (rows, n_sources) weights a group's adapters per row."""
        future: Future = Future()
        with self._lock:
            entry = self._acquire(adapter)

        def job() -> None:
            try:
                with self._lock:
                    slot = self._slot_for(entry)
                    self._rebuild_if_dirty()
                out = []
                for i in range(0, len(prompts), self.limits.max_batch):
                    chunk = slice(i, i + self.limits.max_batch)
                    weights = None if source_weights is None else source_weights[chunk]
                    out.append(self.runtime.target_nll(prompts[chunk], targets[chunk], [slot] * len(prompts[chunk]), weights))
                future.set_result(torch.cat(out))
            except Exception as error:  # handed to the caller, who maps it
                future.set_exception(error)
            finally:
                with self._lock:
                    self._release(entry)

        with self._lock:
            self._jobs.append(job)
            self._lock.notify()
        return future

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self.decoder.active or self._jobs)

    # ---- residency (lock held) ---------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(n for n, e in self._entries.items() if not e.hidden)) or "none"
            raise NotFoundError(f"no adapter named {name!r} is loaded (loaded: {known}); call LoadAdapter first")
        return entry

    def _acquire(self, name: str | None) -> _Entry | None:
        if name is None:
            return None
        entry = self._entry(name)
        entry.refs += 1
        entry.last_used = time.monotonic()
        return entry

    def _release(self, entry: _Entry | None) -> None:
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs == 0 and entry.removed:
            self._release_slot(entry)

    def _release_slot(self, entry: _Entry) -> None:
        if entry.slot is not None:
            self._slots[entry.slot - 1] = None
            entry.slot = None
            self._dirty = True

    def _make_resident(self, entry: _Entry) -> None:
        if entry.sources is None:
            if self.reload is None:
                raise NotFoundError(f"adapter {entry.info.name!r} was evicted and there is no store to reload it from")
            entry.sources = [self.reload(entry.info.name)]
            self.stats["loads"] += 1
            self._enforce_budget(keep=entry)

    def _admit(self, entry: _Entry) -> None:
        """Register a resident entry within the memory budget, or refuse it whole (nothing half-registered)."""
        self._entries[entry.info.name] = entry
        try:
            self._enforce_budget()
        except LimitExceededError:
            del self._entries[entry.info.name]
            raise

    def _enforce_budget(self, keep: _Entry | None = None) -> None:
        """Evict least recently used, unpinned, unused adapters until the budget holds."""
        resident = [e for e in self._entries.values() if e.sources is not None]
        total = sum(e.info.size_bytes for e in resident)
        for e in sorted(resident, key=lambda e: e.last_used):
            if total <= self.limits.memory_budget_bytes:
                return
            if e is keep or e.info.pinned or e.refs > 0 or self.reload is None:
                continue
            e.sources = None
            self._release_slot(e)
            total -= e.info.size_bytes
            self.stats["evictions"] += 1
        if total > self.limits.memory_budget_bytes:
            raise LimitExceededError(
                f"resident adapters need {total / 1e6:.1f} MB, over the memory budget of "
                f"{self.limits.memory_budget_bytes / 1e6:.1f} MB, and nothing can be evicted (pinned or in use)"
            )

    def _slot_for(self, entry: _Entry | None) -> int:
        if entry is None:
            return 0
        self._make_resident(entry)
        if entry.slot is None:
            free = next((i for i, e in enumerate(self._slots) if e is None), len(self._slots))
            if free == len(self._slots):
                self._slots.append(None)
            self._slots[free] = entry
            entry.slot = free + 1
            self._dirty = True
        return entry.slot

    def _rebuild_if_dirty(self) -> None:
        if self._dirty:
            self.runtime.set_slots([e.sources if e is not None and e.sources is not None else [] for e in self._slots])
            self._dirty = False

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        active: dict[int, _Pending] = {}
        while True:
            with self._lock:
                while not (self._waiting or self._jobs or self.decoder.active or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    break
                jobs, self._jobs = self._jobs, []
                joining: list[_Pending] = []
                while self._waiting and len(active) + len(joining) < self.limits.max_batch:
                    pending = self._waiting.popleft()
                    if pending.request.cancelled:
                        self._finish(pending, Event(finish_reason="cancelled"))
                        continue
                    try:
                        pending.request.slot = self._slot_for(pending.entry)
                    except Exception as error:  # e.g. over budget: that request fails, others go on
                        self._finish(pending, Event(error=error))
                        continue
                    joining.append(pending)
                self._rebuild_if_dirty()
            for job in jobs:
                job()
            if joining:
                self.decoder.admit([p.request for p in joining])
                active.update((id(p.request), p) for p in joining)
            if self.decoder.active:
                self.stats["batch_size"] = len(self.decoder.active)
                self._deliver(self.decoder.step(), active)
                self.stats["batch_size"] = len(self.decoder.active)
        for pending in list(active.values()) + list(self._waiting):
            pending.request.cancelled = True
            self._finish(pending, Event(finish_reason="cancelled"))

    def _deliver(self, emitted: list[tuple[Request, int]], active: dict[int, _Pending]) -> None:
        finished = [p for p in active.values() if p.request.finish_reason is not None]
        self.stats["tokens"] += len(emitted)
        for request, _ in emitted:
            pending = active[id(request)]
            if request.finish_reason is not None:
                continue
            end = _holdback(request.text, request.stop)
            self._send(pending, end)
        for pending in finished:
            del active[id(pending.request)]
            r = pending.request
            if r.finish_reason == "cancelled":
                self._finish(pending, Event(finish_reason="cancelled"))
                continue
            text = r.text[pending.sent_text :]
            ids = tuple(r.output_ids[pending.sent_ids :])
            self._finish(pending, Event(text, ids, r.finish_reason, len(r.prompt_ids), len(r.output_ids)))

    def _send(self, pending: _Pending, end: int) -> None:
        r = pending.request
        if end > pending.sent_text:
            ids = tuple(r.output_ids[pending.sent_ids :])
            pending.emit(Event(r.text[pending.sent_text : end], ids))
            pending.sent_text, pending.sent_ids = end, len(r.output_ids)

    def _finish(self, pending: _Pending, event: Event) -> None:
        with self._lock:
            self._release(pending.entry)
        pending.emit(event)

