"""Blocking work off the event loop, in threads that end as soon as no work is waiting.

A thread that runs torch keeps its own OpenMP team (idle helper threads) for as long as it
lives. Once the process holds more OpenMP threads than cores, libgomp shortens the spin of
every team between parallel regions to almost nothing (its "throttled" spin count), so each of
the engine's thousands of small parallel regions per forward waits on a futex instead. Measured
on 2 cores: a one-row prefill took 125 ms before and 173 ms after 20 merges had run in a pooled
thread (up to 238 ms after batched QRs); asyncio's default pool keeps its threads, and a server
loads its model in one, so it always served that way. A team goes away with its thread: these threads end when the
queue is empty, and the engine's team spins again.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class ShortLivedThreads(Executor):
    """Up to `max_workers` threads; each runs queued calls and ends when none is left."""

    def __init__(self, max_workers: int, name: str = "adapter-fusion-worker") -> None:
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future, Callable[[], Any]]] = deque()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.append((future, functools.partial(fn, *args, **kwargs)))
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=self.name)
                try:
                    thread.start()  # it waits for this lock before looking at the queue
                except BaseException:
                    self._queue.pop()  # not started: the caller gets the error, nothing runs later
                    raise
                self._threads.add(thread)
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads.discard(threading.current_thread())
                    return
                future, call = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as error:  # as ThreadPoolExecutor: the caller gets it
                future.set_exception(error)
            else:
                future.set_result(result)
            del future, call  # no reference to the last call's result while the thread waits for the lock

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()


WORKERS = ShortLivedThreads(max_workers=min(32, (os.cpu_count() or 1) + 4))  # asyncio's default pool's size


async def in_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread` on `WORKERS`: the call sees the caller's context variables."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(WORKERS, call)
