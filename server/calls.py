"""How every RPC is run: drain accounting, errors to status codes, progress from worker threads,
and one writer per adapter name. No RPC logic lives here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from adapter_fusion.errors import EngineFaultError, ShuttingDownError, new_error_id
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.status_codes import status_of

log = logging.getLogger("adapter_fusion.server")
MAX_DETAILS = 1000  # characters of an error message sent to a client


@dataclass
class Observer:
    """Hooks for metrics; no-ops by default so the service does not depend on prometheus."""

    rpc_done: Callable[[str, str, float], None] = lambda method, code, seconds: None
    first_token: Callable[[float], None] = lambda seconds: None


def details_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a client sees. Bugs are logged with an error id and the
    client gets only the id; every message is cut to MAX_DETAILS."""
    code = status_of(error)
    if code == grpc.StatusCode.INTERNAL and not isinstance(error, EngineFaultError):
        error_id = new_error_id()
        log.error("internal error (error id %s)", error_id, exc_info=error)
        return code, f"internal error (error id {error_id}); the server log has the details"
    text = str(error)
    return code, text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 3] + "..."


class Calls:
    """Counts calls in flight (a drain waits for them), refuses new ones while draining, maps errors."""

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer = observer or Observer()
        self.in_flight = 0
        self.draining = False

    @asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext):
        """Count the call, refuse it while draining, turn what it raises into a status code."""
        start, outcome = time.perf_counter(), "OK"
        if self.draining:
            await context.abort(*details_of(ShuttingDownError("the server is shutting down; retry on another replica")))
        self.in_flight += 1
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "CANCELLED"
            raise
        except Exception as error:
            status, text = details_of(error)
            outcome = status.name
            await context.abort(status, text)
        finally:
            self.in_flight -= 1
            self.observer.rpc_done(method, outcome, time.perf_counter() - start)

    async def unary(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Any]]) -> Any:
        async with self._call(method, context):
            return await work()

    async def streaming(self, method: str, context: grpc.aio.ServicerContext, messages: AsyncIterator) -> AsyncIterator:
        """Forward a handler's messages; map its errors to status codes and report the outcome."""
        async with self._call(method, context):
            async for message in messages:
                yield message


class NameLocks:
    """One writer per adapter name: Load/Compose/Unload/Export of a name run one at a time."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, name: str):
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


@dataclass(frozen=True)
class Done:
    result: Any


async def reports_of(work: Callable[[Callable[[Any], None]], Any]) -> AsyncIterator[Any]:
    """Run work(report) in a thread; yield each item it reports as it comes, then Done(result)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(in_thread(work, lambda item: loop.call_soon_threadsafe(updates.put_nowait, item)))
    try:
        while not task.done() or not updates.empty():
            getter = asyncio.ensure_future(updates.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        yield Done(task.result())
    finally:
        if not task.done():  # the caller left (cancelled): the worker stops at its next check
            task.add_done_callback(lambda t: t.exception())  # retrieved, so it is not logged as lost


def thread_safe_emit(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Any], None]:
    """A callback other threads may call at any time: after the loop closed it drops the item
    instead of raising into the engine thread."""

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    return emit
