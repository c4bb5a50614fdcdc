"""The continuous batch: requests waiting, rows decoding, jobs run between steps.

Handlers (any thread) queue generations and jobs; the engine thread (`adapter_fusion.engine`)
calls `round()` over and over: it admits waiting requests at a step boundary into one batch
(`decoding.Decoder`), gives each its slot (the registry's numbers; the runtime's buffers are
written only for slots that changed), runs the queued jobs, then decodes one step and hands the
tokens back through each request's callback before the next forward. A typed error (over
budget, bad input, a job that runs out of memory) ends only its request or job; any other
exception leaves `round()` as a fault, and the engine ends everything held (`fail_held`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

from adapter_fusion.decoding import Decoder
from adapter_fusion.errors import AdapterFusionError, LimitExceededError
from adapter_fusion.limits import Limits
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.work import Event, Job, Pending


class Scheduler:
    def __init__(self, runtime: Runtime, registry: AdapterRegistry, limits: Limits) -> None:
        self.runtime = runtime
        self.registry = registry
        self.limits = limits
        self.wake = threading.Condition()  # guards the queues; notified when work arrives or the engine stops
        self.decoder = Decoder(runtime)
        self._waiting: deque[Pending] = deque()
        self._jobs: deque[Job] = deque()
        self._active: dict[int, Pending] = {}  # held by the engine thread: joining or decoding
        self._running: list[Job] = []  # jobs taken by the engine thread this round
        self.stats = {"tokens": 0, "requests": 0, "batch_size": 0}

    # ---- queues (any thread, `wake` held) -----------------------------------------------------

    def check_room(self) -> None:
        """Refuse a generation while the queue is full (before it holds any adapter)."""
        if len(self._waiting) >= self.limits.max_queue:
            raise LimitExceededError(f"the queue is full ({self.limits.max_queue} waiting requests); retry later")

    def queue(self, pending: Pending) -> None:
        self._waiting.append(pending)
        self.stats["requests"] += 1
        self.wake.notify()

    def queue_job(self, job: Job) -> None:
        self._jobs.append(job)
        self.wake.notify()

    @property
    def depth(self) -> int:
        with self.wake:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self.wake:
            return bool(self._waiting or self._active or self._jobs or self._running)

    # ---- the engine thread --------------------------------------------------------------------

    def round(self, serving: Callable[[], bool]) -> bool:
        """Wait for work, then admit, run jobs and decode one step; False once not `serving()`."""
        with self.wake:
            while not (self._waiting or self._jobs or self.decoder.active or not serving()):
                self.wake.wait()
            if not serving():
                return False
            self._running = list(self._jobs)
            self._jobs.clear()
            joining: list[Pending] = []
            while self._waiting and len(self._active) < self.limits.max_batch:
                pending = self._waiting.popleft()
                self._active[id(pending.request)] = pending
                joining.append(pending)
        joining = [p for p in joining if self._slot_ready(p)]  # may read the store: no lock held
        self._install_slots()
        for job in self._running:
            self._run_job(job)
        self._running = []
        if joining:
            self.decoder.admit([p.request for p in joining])
        if self.decoder.active:
            self.stats["batch_size"] = len(self.decoder.active)
            self._deliver(self.decoder.choose())  # tokens go out before the next forward, not after it
            self.decoder.advance()
            self.stats["batch_size"] = len(self.decoder.active)
        return True

    def _slot_ready(self, pending: Pending) -> bool:
        if pending.request.cancelled:
            self._end(pending, Event(finish_reason="cancelled"))
            return False
        try:
            pending.request.route = self.registry.route_for(pending.hold)
            return True
        except AdapterFusionError as error:  # e.g. over budget: that request fails, others go on
            self._end(pending, Event(error=error))
            return False

    def _install_slots(self) -> None:
        """Write the slots that changed, and only those."""
        for slot, sources in self.registry.take_slot_changes():
            if sources:
                self.runtime.write_slot(slot, sources)
            else:
                self.runtime.free_slot(slot)

    def _run_job(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            self._let_go(job)
            return
        try:
            route = self.registry.route_for(job.hold)
            self._install_slots()  # out of memory here is a fault: slot columns may be half-moved
            try:
                result = job.work(route, job)
            except torch.OutOfMemoryError:  # too much work in one job (e.g. long examples): that job's failure
                raise LimitExceededError("the device ran out of memory for this work; send fewer or shorter examples") from None
            job.future.set_result(result)
        except AdapterFusionError as error:  # that job's own failure; other exceptions are faults
            job.future.set_exception(error)
        finally:
            self._let_go(job)

    def _deliver(self, emitted: list) -> None:
        self.stats["tokens"] += len(emitted)
        for request, _ in emitted:
            if request.finish_reason is None:
                self._active[id(request)].stream()
        for pending in [p for p in self._active.values() if p.request.finish_reason is not None]:
            self._end(pending, pending.finished())

    def _end(self, pending: Pending, event: Event) -> None:
        self._active.pop(id(pending.request), None)
        self._let_go(pending)
        pending.emit(event)

    def _let_go(self, holder: Pending | Job) -> None:
        if not holder.released:
            holder.released = True
            self.registry.release(holder.hold)

    # ---- after a fault or at stop ---------------------------------------------------------------

    def fail_held(self, error: Exception, include_active: bool) -> None:
        """End every queued request and job (and, from the engine thread or after it, the held ones)."""
        with self.wake:
            pendings = list(self._waiting) + (list(self._active.values()) if include_active else [])
            jobs = list(self._jobs) + (self._running if include_active else [])
            self._waiting.clear()
            self._jobs.clear()
            if include_active:
                self._active, self._running = {}, []
        for pending in pendings:
            pending.request.cancelled = True
            self._let_go(pending)
            pending.emit(Event(error=error))
        for job in jobs:
            job.cancelled.set()
            if not job.future.done():
                job.future.set_exception(error)
            self._let_go(job)

    def reset(self) -> None:
        """A fresh batch after a fault; every slot is written again (a fault mid-write leaves columns unknown)."""
        self.decoder = Decoder(self.runtime)
        self.runtime.slots.clear()
        self.registry.invalidate_slots()
