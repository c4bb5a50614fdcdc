"""The serving engine: one supervised thread owns the model and runs a continuous mixed-adapter batch.

Handlers (any thread) submit generations and scoring jobs; the engine thread admits waiting
requests at step boundaries into one batch (`runtime.Decoder`), runs jobs between steps, and
hands tokens back through each request's callback. Names, residency and slots are the
registry's (`adapter_fusion.registry`).

Supervision: a typed error (over budget, bad input) ends only its request. Any other exception
on the engine thread is a fault: every request it holds or has queued ends at once with
`EngineFaultError` (its id is logged with the traceback), the state goes to "restarting", the
decoder and slot buffers are rebuilt after `restart_delay_s`, and the state returns to
"serving". After `max_faults` faults within `fault_window_s` the state is "failed" for good
(the server then exits non-zero, so an orchestrator restarts the process). Nothing waits forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from adapter_fusion.errors import (
    AdapterFusionError,
    EngineFaultError,
    InvalidRequestError,
    LimitExceededError,
    RequestCancelledError,
    ShuttingDownError,
    UnavailableError,
    new_error_id,
)
from adapter_fusion.decoding import Decoder, Request
from adapter_fusion.registry import AdapterRegistry, Choice
from adapter_fusion.runtime import Runtime
from adapter_fusion.limits import Limits
from adapter_fusion.work import Event, Job, Pending

__all__ = ["Engine", "Event", "Limits"]

log = logging.getLogger("adapter_fusion.engine")


class Engine:
    def __init__(
        self,
        runtime: Runtime,
        limits: Limits = Limits(),
        reload: Callable | None = None,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.limits = limits
        self.registry = AdapterRegistry(runtime.check, runtime.slot_bytes, limits.memory_budget_bytes, reload)
        self.on_state = on_state or (lambda state: None)  # "serving", "restarting", "failed", "stopped"
        self.state = "starting"
        self.decoder = Decoder(runtime)
        self._waiting: deque[Pending] = deque()
        self._jobs: deque[Job] = deque()
        self._active: dict[int, Pending] = {}  # held by the engine thread: joining or decoding
        self._running: list[Job] = []  # jobs taken by the engine thread this round
        self._wake = threading.Condition()
        self._faults: deque[float] = deque()
        self._thread = threading.Thread(target=self._run, name="adapter-fusion-engine", daemon=True)
        self.stats = {"tokens": 0, "requests": 0, "batch_size": 0, "faults": 0}

    # ---- requests (any thread) ---------------------------------------------------------------

    def submit(self, request: Request, adapter: Choice, emit: Callable[[Event], None]) -> Request:
        """Queue a generation with an adapter, a weighted mix of loaded adapters (served with no
        merge) or None (the base model); tokens arrive through `emit` (called on the engine
        thread; it must not raise)."""
        self.limits.check(request)
        with self._wake:
            self._check_open()
            if len(self._waiting) >= self.limits.max_queue:
                raise LimitExceededError(f"the queue is full ({self.limits.max_queue} waiting requests); retry later")
            self._waiting.append(Pending(request, self.registry.hold(adapter), emit))
            self.stats["requests"] += 1
            self._wake.notify()
        return request

    def score(
        self, adapter: Choice, prompts: list[list[int]], targets: list[list[int]], source_weights: torch.Tensor | None = None
    ) -> Job:
        """Summed target NLL per example (`job.future`, a tensor), computed on the engine thread
        between steps in chunks of `max_batch` rows; `job.cancelled.set()` abandons it at the next
        chunk. `source_weights` (rows, n_sources) weights a group's adapters per row."""
        if any(not p for p in prompts) or any(not t for t in targets):
            raise InvalidRequestError("every example needs a non-empty input and target (after tokenising)")

        def work(route, job: Job) -> torch.Tensor:
            out = []
            for i in range(0, len(prompts), self.limits.max_batch):
                if job.cancelled.is_set():
                    raise RequestCancelledError("scoring abandoned: the client cancelled or its deadline passed")
                chunk = slice(i, i + self.limits.max_batch)
                weights = None if source_weights is None else source_weights[chunk]
                out.append(self.runtime.target_nll(prompts[chunk], targets[chunk], [route] * len(prompts[chunk]), weights))
            return torch.cat(out)

        return self.run(adapter, work)

    def run(self, adapter: Choice, work: Callable[[object, Job], object]) -> Job:
        """Run `work(route, job)` on the engine thread between decode steps, with `adapter` placed
        in a slot (`route`); its result or error arrives in `job.future`. Streams wait while it
        runs: split long work into several jobs (as SearchWeights' learned does per chunk)."""
        with self._wake:
            self._check_open()
            job = Job(self.registry.hold(adapter), work)
            self._jobs.append(job)
            self._wake.notify()
        return job

    def _check_open(self) -> None:  # lock held
        if self.state != "serving":
            reason = {"restarting": "restarting after a fault", "failed": "down after repeated faults"}.get(self.state, self.state)
            raise (ShuttingDownError if self.state == "stopped" else UnavailableError)(
                f"the serving engine is {reason}; retry shortly or on another replica"
            )

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._set_state("serving")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; every request still queued or held ends with UNAVAILABLE."""
        with self._wake:
            if self.state != "failed":
                self.state = "stopped"
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        stopped = ShuttingDownError("the server stopped before this request finished; retry on another replica")
        self._fail_held(stopped, include_active=not self._thread.is_alive())
        self.on_state("stopped")

    @property
    def queue_depth(self) -> int:
        with self._wake:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._wake:
            return bool(self._waiting or self._active or self._jobs or self._running)

    def _set_state(self, state: str) -> None:
        with self._wake:
            if self.state == "stopped" and state != "stopped":
                return
            self.state = state
        self.on_state(state)

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception as error:  # a fault: end what it held, then restart or give up
                if not self._recover(error):
                    return

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._jobs or self.decoder.active or self.state != "serving"):
                    self._wake.wait()
                if self.state != "serving":
                    return
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
                self._deliver(self.decoder.step())
                self.stats["batch_size"] = len(self.decoder.active)

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

    def _deliver(self, emitted: list[tuple[Request, int]]) -> None:
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

    # ---- supervision -------------------------------------------------------------------------

    def _recover(self, error: Exception) -> bool:
        """End everything the fault touched; restart after a pause, or give up. Returns whether to go on."""
        error_id = new_error_id()
        log.error("engine fault (error id %s); ending every request it held", error_id, exc_info=error)
        self.stats["faults"] += 1
        now = time.monotonic()
        self._faults.append(now)
        while self._faults and self._faults[0] < now - self.limits.fault_window_s:
            self._faults.popleft()
        give_up = len(self._faults) >= self.limits.max_faults
        self._set_state("failed" if give_up else "restarting")
        self._fail_held(EngineFaultError(error_id), include_active=True)
        self.decoder = Decoder(self.runtime)
        self.runtime.slots.clear()  # a fault mid-write leaves columns unknown: write every slot again
        self.registry.invalidate_slots()
        if give_up:
            log.error("engine failed %d times within %.0f s; not restarting", len(self._faults), self.limits.fault_window_s)
            return False
        with self._wake:
            self._wake.wait_for(lambda: self.state == "stopped", timeout=self.limits.restart_delay_s)
        self._set_state("serving")
        return self.state == "serving"

    def _fail_held(self, error: Exception, include_active: bool) -> None:
        """End every queued request and job (and, from the engine thread or after it, the held ones)."""
        with self._wake:
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
