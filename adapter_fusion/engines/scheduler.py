"""The continuous batch: requests waiting, rows decoding, jobs run between steps.

Handlers (any thread) queue generations and jobs; the engine thread (`adapter_fusion.engines.builtin`)
calls `round()` over and over: it admits waiting requests at a step boundary into one batch
(`decoding.Decoder`), gives each its slot (the registry's numbers; the runtime's buffers are
written only for slots that changed), runs one piece of one queued job, then decodes one step and
hands the tokens back through each request's callback before the next forward (each of these
points fires a phase of `hooks`, `adapter_fusion.engines.hooks`, for callers that await it). A typed error
(over budget, bad input, a job that runs out of memory) ends only its request or job; any other
exception leaves `round()` as a fault, and the engine ends everything held (`fail_held`).

Fairness: what waits is kept per tenant (`fair_queue.FairQueue`) and taken in turn: admission
prefers the tenant holding the fewest rows, no named tenant holds more than its share of rows or
queue places (None, a caller that names none, is one tenant without those caps), and one round's prefill stays within `max_job_tokens` (at least one request). A job runs
one token-bounded piece per round, jobs in turn, so a stream waits at most about one piece.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable

import torch

from adapter_fusion.decoding import Decoder, Request
from adapter_fusion.engines.hooks import EngineHooks
from adapter_fusion.errors import AdapterFusionError, LimitExceededError, RequestCancelledError
from adapter_fusion.fair_queue import FairQueue
from adapter_fusion.limits import Limits
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.work import CANCELLED, Event, Job, Pending



class Scheduler:
    def __init__(self, runtime: Runtime, registry: AdapterRegistry, limits: Limits) -> None:
        self.runtime = runtime
        self.registry = registry
        self.limits = limits
        self.wake = threading.Condition()  # guards the queues; notified when work arrives or the engine stops
        self.decoder = Decoder(runtime)
        self._waiting: FairQueue[Pending] = FairQueue()
        self._jobs: FairQueue[Job] = FairQueue()
        self._active: dict[int, Pending] = {}  # held by the engine thread: joining or decoding
        self._running: Job | None = None  # the job whose piece the engine thread runs this round
        self.stats = {"tokens": 0, "requests": 0, "batch_size": 0}
        self.hooks = EngineHooks()  # admitted, forward, emitted, slot_written (and the engine's fault, ended)

    # ---- queues (any thread, `wake` held) -----------------------------------------------------

    def check_room(self, tenant: Hashable = None) -> None:
        """Refuse a generation while the queue, or this tenant's share of it, is full (before it holds any adapter)."""
        if len(self._waiting) >= self.limits.max_queue:
            raise LimitExceededError(f"the queue is full ({self.limits.max_queue} waiting requests); retry later")
        if tenant is not None and self._waiting.count(tenant) >= self.limits.tenant_queue:
            raise LimitExceededError(
                f"this connection already has {self.limits.tenant_queue} requests waiting, its share of the queue of "
                f"{self.limits.max_queue}; wait for some to finish, then retry"
            )

    def queue(self, pending: Pending) -> None:
        self._waiting.push(pending.tenant, pending)
        self.stats["requests"] += 1
        self.wake.notify()

    def queue_job(self, job: Job) -> None:
        self._jobs.push(job.tenant, job)
        self.wake.notify()

    def drop_request(self, request: Request) -> list[Pending]:
        """Mark a generation cancelled; if it still waits, take it out now (end it with `end_dropped`)."""
        request.cancelled = True
        return self._waiting.remove(lambda p: p.request is request)

    def drop_jobs(self, cancelled: threading.Event) -> list[Job]:
        """Cancel a call: every queued job sharing its event leaves now (end them with `end_dropped`);
        a piece already running finishes, and its job ends after it."""
        cancelled.set()
        return self._jobs.remove(lambda job: job.cancelled is cancelled)

    @property
    def depth(self) -> int:
        with self.wake:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self.wake:
            return bool(self._waiting or self._active or self._jobs or self._running)

    def end_dropped(self, pendings: list[Pending], jobs: list[Job], error: Exception | None = None) -> None:
        """End what `drop_*` or `fail_held` took out of the queues (no lock held)."""
        for pending in pendings:
            pending.request.cancelled = True
            self._let_go(pending)
            pending.emit(Event(error=error) if error is not None else Event(finish_reason="cancelled"))
        for job in jobs:
            job.cancelled.set()
            job.fail(error or RequestCancelledError(CANCELLED))
            self._let_go(job)

    # ---- the engine thread --------------------------------------------------------------------

    def round(self, serving: Callable[[], bool]) -> bool:
        """Wait for work, then admit, run one job piece and decode one step; False once not `serving()`."""
        with self.wake:
            while not (self._waiting or self._jobs or self.decoder.active or not serving()):
                self.wake.wait()
            if not serving():
                return False
            joining = self._admit()
            self._running = self._jobs.pop()  # one job's piece per round, tenants in turn
        joining = [p for p in joining if self._slot_ready(p)]  # may read the store: no lock held
        self._install_slots()
        if self._running is not None:
            self._run_piece(self._running)
            self._running = None
        if joining:
            self.hooks.fire("admitted", [p.request for p in joining])
            self.hooks.fire("forward", "prefill")
            self.decoder.admit([p.request for p in joining])
        if self.decoder.active:
            self.stats["batch_size"] = len(self.decoder.active)
            self._deliver(self.decoder.choose())  # tokens go out before the next forward, not after it
            if self.decoder.active:
                self.hooks.fire("forward", "decode")
            self.decoder.advance()
            self.stats["batch_size"] = len(self.decoder.active)
        return True

    def _admit(self) -> list[Pending]:  # `wake` held
        """Waiting requests into free rows: tenants in turn, fewest rows held first, none over its
        share; the prefill within `max_job_tokens` (rows x longest prompt), at least one request."""
        rows = Counter(p.tenant for p in self._active.values())
        joining: list[Pending] = []
        width = 0
        while len(self._active) < self.limits.max_batch:
            pending = self._waiting.pop(rank=rows.__getitem__, allowed=lambda t: t is None or rows[t] < self.limits.tenant_rows)
            if pending is None:
                break
            wider = max(width, len(pending.request.prompt_ids))
            if joining and wider * (len(joining) + 1) > self.limits.max_job_tokens:
                self._waiting.push_front(pending.tenant, pending)  # first in the next round
                break
            width = wider
            self._active[id(pending.request)] = pending
            rows[pending.tenant] += 1
            joining.append(pending)
        return joining

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
            self.hooks.fire("slot_written", slot, sources)

    def _run_piece(self, job: Job) -> None:
        """Run the job's next piece; then end it (last piece, an error, cancelled) or queue it again."""
        if job.done == 0 and not job.future.set_running_or_notify_cancel():  # its caller gave up before it began
            self._let_go(job)
            return
        try:
            if job.cancelled.is_set():
                raise RequestCancelledError(CANCELLED)
            route = self.registry.route_for(job.hold)
            self._install_slots()  # out of memory here is a fault: slot columns may be half-moved
            try:
                job.pieces[job.done](route, job)
                job.done += 1
                if job.done == len(job.pieces):
                    job.future.set_result(job.result())
            except torch.OutOfMemoryError:  # too much work in one piece (e.g. long examples): that job's failure
                raise LimitExceededError("the device ran out of memory for this work; send fewer or shorter examples") from None
        except AdapterFusionError as error:  # that job's own failure; other exceptions are faults
            job.fail(error)
        if not job.future.done():
            with self.wake:
                if not job.cancelled.is_set():  # its call may have been cancelled while the piece ran
                    self._jobs.push(job.tenant, job)
                    return
            job.fail(RequestCancelledError(CANCELLED))
        self._let_go(job)

    def _deliver(self, emitted: list) -> None:
        self.stats["tokens"] += len(emitted)
        for request, _ in emitted:
            if request.finish_reason is None:
                self._active[id(request)].stream()
        for pending in [p for p in self._active.values() if p.request.finish_reason is not None]:
            self._end(pending, pending.finished())
        self.hooks.fire("emitted", emitted)

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
            pendings = self._waiting.clear() + (list(self._active.values()) if include_active else [])
            jobs = self._jobs.clear() + ([self._running] if include_active and self._running is not None else [])
            if include_active:
                self._active, self._running = {}, None
        self.end_dropped(pendings, jobs, error)

    def reset(self) -> None:
        """A fresh batch after a fault; every slot is written again (a fault mid-write leaves columns unknown)."""
        self.decoder = Decoder(self.runtime)
        self.runtime.slots.clear()
        self.registry.invalidate_slots()
