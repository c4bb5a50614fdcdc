"""Waiting work kept per tenant (a connection, or whoever the caller names) and taken round-robin
across tenants, so one tenant's thousand requests wait behind each other, not in front of
everyone else's. Not thread-safe: the scheduler holds its lock around every call."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()  # in turn order: the next tenant first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues.values():
            yield from queue

    def count(self, tenant: Hashable) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def push(self, tenant: Hashable, item: T) -> None:
        self._queues.setdefault(tenant, deque()).append(item)
        self._size += 1

    def push_front(self, tenant: Hashable, item: T) -> None:
        """Put back an item just popped: first in its tenant's queue, its tenant first in turn."""
        self._queues.setdefault(tenant, deque()).appendleft(item)
        self._queues.move_to_end(tenant, last=False)
        self._size += 1

    def pop(self, rank: Callable[[Hashable], int] | None = None, allowed: Callable[[Hashable], bool] | None = None) -> T | None:
        """The oldest item of the next tenant in turn that is `allowed`, preferring the lowest
        `rank` (e.g. rows it holds); that tenant then goes to the back of the turn. None if none."""
        best, best_rank = None, None
        for tenant in self._queues:
            if allowed is not None and not allowed(tenant):
                continue
            r = 0 if rank is None else rank(tenant)
            if best_rank is None or r < best_rank:
                best, best_rank = tenant, r
                if r == 0:
                    break
        if best_rank is None:
            return None
        queue = self._queues.pop(best)
        item = queue.popleft()
        if queue:
            self._queues[best] = queue  # back of the turn
        self._size -= 1
        return item

    def remove(self, match: Callable[[T], bool]) -> list[T]:
        """Take out every item that matches, at once, wherever it waits."""
        taken: list[T] = []
        for tenant in list(self._queues):
            kept: deque[T] = deque()
            for item in self._queues[tenant]:
                (taken if match(item) else kept).append(item)
            if len(kept) != len(self._queues[tenant]):
                if kept:
                    self._queues[tenant] = kept
                else:
                    del self._queues[tenant]
        self._size -= len(taken)
        return taken

    def clear(self) -> list[T]:
        items = list(self)
        self._queues.clear()
        self._size = 0
        return items
