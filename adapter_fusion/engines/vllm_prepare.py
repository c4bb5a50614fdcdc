"""The vLLM engine's preparing threads, shared fairly between tenants (connections).

Preparing a request's LoRA may take seconds (composing a weighted mix no one asked for before).
With one shared FIFO a tenant sending many distinct weightings would hold every thread and every
other tenant's request, even one for a registered adapter, would wait behind its whole backlog.
Here each named tenant has at most one piece of preparing work running at a time, and tenants take
turns (`fair_queue.FairQueue`): a flood holds one thread and the others serve everyone else. Work
of no named tenant (in-process callers, a cluster replica's forwarded calls) is not limited.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable

from adapter_fusion.errors import AdapterFusionError, EngineFaultError, new_error_id
from adapter_fusion.fair_queue import FairQueue

Work = Callable[[], None]
log = logging.getLogger("adapter_fusion.engine")


class PrepareQueue:
    def __init__(self, threads: int, name: str) -> None:
        self._wake = threading.Condition()
        self._waiting: FairQueue[tuple[Hashable, Work]] = FairQueue()
        self._running: set[Hashable] = set()  # named tenants with work on a thread now
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, tenant: Hashable, work: Work) -> None:
        """Run `work()` on a preparing thread in `tenant`'s turn (dropped if the queue is closed first)."""
        with self._wake:
            if self._closed:
                return
            self._waiting.push(tenant, (tenant, work))
            self._wake.notify()

    def close(self) -> None:
        """Drop what waits (its owners are ended by the engine) and wait for what runs."""
        with self._wake:
            self._closed = True
            self._waiting.clear()
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()

    def _free(self, tenant: Hashable) -> bool:
        return tenant is None or tenant not in self._running

    def _serve(self) -> None:
        while True:
            with self._wake:
                item = None
                while not self._closed and (item := self._waiting.pop(allowed=self._free)) is None:
                    self._wake.wait()
                if item is None:
                    return
                tenant, work = item
                if tenant is not None:
                    self._running.add(tenant)
            try:
                work()
            except Exception:  # the work ends its own request on errors it expects; never lose a thread
                log.exception("preparing work failed")
            finally:
                with self._wake:
                    self._running.discard(tenant)
                    self._wake.notify_all()  # that tenant's next piece may run now


def preparing_error(error: Exception) -> AdapterFusionError:
    """What a request whose LoRA could not be prepared ends with: our errors as they are; anything
    else (a LoRA dir that cannot be written) logged under an error id, the engine going on."""
    if isinstance(error, AdapterFusionError):
        return error
    error_id = new_error_id()
    log.error("preparing a request's LoRA failed (error id %s)", error_id, exc_info=error)
    return EngineFaultError(error_id)
