"""The serving engine: one supervised thread owns the model and runs the continuous batch.

Handlers (any thread) submit generations and jobs (scoring, learned steps), each with an
optional tenant (whose turn it takes) and cancel event (shared by one call's jobs); the engine
thread runs the scheduler's rounds (`adapter_fusion.engines.scheduler`: admission, slots, one job piece,
one decode step each). Names, residency and slot numbers are the registry's (`adapter_fusion.registry`).

Supervision: a typed error (over budget, bad input) ends only its request. Any other exception
on the engine thread is a fault: every request it holds or has queued ends at once with
`EngineFaultError` (its id is logged with the traceback), the state goes to "restarting", the
decoder and slot buffers are rebuilt after `restart_delay_s`, and the state returns to
"serving". After `max_faults` faults within `fault_window_s` the state is "failed" for good
(the server then exits non-zero, so an orchestrator restarts the process). Nothing waits forever.

`hooks` (`adapter_fusion.engines.hooks`): the phases of the engine thread a caller can await
(admitted, forward, emitted, slot_written, fault, ended) instead of sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

import torch

from adapter_fusion.decoding import Decoder, Request
from adapter_fusion.engines.lifecycle import Lifecycle
from adapter_fusion.engines.base import check_examples
from adapter_fusion.errors import EngineFaultError, RequestCancelledError, ShuttingDownError, new_error_id
from adapter_fusion.limits import Limits
from adapter_fusion.entries import Choice, Hold
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.engines.scheduler import Scheduler
from adapter_fusion.work import Event, Job, Pending, Piece, token_chunks

__all__ = ["Engine", "Event", "Limits"]

log = logging.getLogger("adapter_fusion.engine")


class Engine:
    """The builtin engine (`engines.base.ServingEngine`): our decoder on a transformers model."""

    name = "builtin"

    def __init__(
        self,
        runtime: Runtime,
        limits: Limits = Limits(),
        reload: Callable | None = None,
        on_state: Callable[[str], None] | None = None,
        registry: AdapterRegistry | None = None,
    ) -> None:
        self.runtime = runtime
        self.limits = limits
        self.registry = registry or AdapterRegistry(runtime.check, runtime.slot_bytes, limits.memory_budget_bytes, reload)
        self.scheduler = Scheduler(runtime, self.registry, limits)
        self.hooks = self.scheduler.hooks
        self._wake = self.scheduler.wake
        self.life = Lifecycle(self._wake, self._run, "adapter-fusion-engine", on_state, failed="down after repeated faults")
        self._faults: deque[float] = deque()
        self.stats = self.scheduler.stats  # one dict: the scheduler counts tokens and requests, the engine faults
        self.stats["faults"] = 0

    # ---- requests (any thread) ---------------------------------------------------------------

    def submit(self, request: Request, adapter: Choice | Hold, emit: Callable[[Event], None], tenant: Hashable = None) -> Request:
        """Queue a generation with an adapter, a weighted mix of loaded adapters (served with no
        merge) or None (the base model); tokens arrive through `emit` (called on the engine
        thread; it must not raise). `tenant` (e.g. the client's connection) takes turns with the
        other tenants for queue places and rows."""
        self.limits.check(request)
        with self._wake:
            self._check_open()
            self.scheduler.check_room(tenant)
            self.scheduler.queue(Pending(request, self.registry.held(adapter), emit, tenant))
        return request

    def check_room(self, tenant: Hashable = None) -> None:
        """Refuse now what `submit` would refuse for room (a full queue or tenant share), before a
        caller spends work on the request; `submit` checks again."""
        with self._wake:
            self._check_open()
            self.scheduler.check_room(tenant)

    def cancel_request(self, request: Request) -> None:
        """The caller is gone: a waiting request leaves the queue now, a decoding one at the next step."""
        with self._wake:
            dropped = self.scheduler.drop_request(request)
        self.scheduler.end_dropped(dropped, [])

    def score(
        self,
        adapter: Choice,
        prompts: list[list[int]],
        targets: list[list[int]],
        source_weights: torch.Tensor | None = None,
        cancelled: threading.Event | None = None,
        tenant: Hashable = None,
    ) -> Job:
        """Summed target NLL per example (`job.future`, a tensor), computed on the engine thread
        between steps in pieces of at most `max_job_tokens` (rows x padded length) and `max_batch`
        rows; `cancel(job.cancelled)` abandons it at once. `source_weights` (rows, n_sources)
        weights a group's adapters per row. `cancelled`: an event shared by a call's jobs."""
        check_examples(prompts, targets)
        out: list[torch.Tensor] = []

        def piece(chunk: slice) -> Piece:
            def work(route, job: Job) -> None:
                weights = None if source_weights is None else source_weights[chunk]
                out.append(self.runtime.target_nll(prompts[chunk], targets[chunk], [route] * len(prompts[chunk]), weights))

            return work

        lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
        pieces = [piece(chunk) for chunk in token_chunks(lengths, self.limits.max_job_tokens, self.limits.max_batch)]
        return self._queue_job(adapter, pieces, lambda: torch.cat(out), cancelled, tenant)

    def run(self, adapter: Choice, work: Callable[[object, Job], object], cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        """Run `work(route, job)` on the engine thread between decode steps, with `adapter` placed
        in a slot (`route`); its result or error arrives in `job.future`. Streams wait while it
        runs: keep it within `max_job_tokens` and split longer work into several jobs."""
        box: list[object] = []
        return self._queue_job(adapter, [lambda route, job: box.append(work(route, job))], lambda: box[0], cancelled, tenant)

    def job_runtime(self) -> Runtime:
        return self.runtime

    def cancel(self, cancelled: threading.Event) -> None:
        """Cancel a call: every queued job sharing this event ends now; a running one after its piece."""
        with self._wake:
            dropped = self.scheduler.drop_jobs(cancelled)
        self.scheduler.end_dropped([], dropped)

    def _queue_job(self, adapter: Choice, pieces: list[Piece], result: Callable[[], object], cancelled: threading.Event | None, tenant: Hashable) -> Job:
        cancelled = cancelled or threading.Event()
        if cancelled.is_set():  # its call ended while it was being prepared
            raise RequestCancelledError("abandoned: the client cancelled or its deadline passed")
        with self._wake:
            self._check_open()
            job = Job(self.registry.held(adapter), pieces, result, cancelled, tenant)
            self.scheduler.queue_job(job)
        return job

    def _check_open(self) -> None:  # lock held
        self.life.check_open()

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.life.state

    def start(self) -> None:
        self.life.start()

    def stop(self) -> None:
        """Stop the thread; every request still queued or held ends with UNAVAILABLE."""
        ended = self.life.halt()
        stopped = ShuttingDownError("the server stopped before this request finished; retry on another replica")
        self.scheduler.fail_held(stopped, include_active=ended)
        self.life.on_state("stopped")

    @property
    def queue_depth(self) -> int:
        return self.scheduler.depth

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def decoder(self) -> Decoder:
        return self.scheduler.decoder

    def _set_state(self, state: str) -> None:
        self.life.set(state)

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    while self.scheduler.round(lambda: self.state == "serving"):
                        pass
                    return
                except Exception as error:  # a fault: end what it held, then restart or give up
                    if not self._recover(error):
                        return
        finally:
            self.hooks.fire("ended")

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
        self.scheduler.fail_held(EngineFaultError(error_id), include_active=True)
        self.scheduler.reset()
        self.hooks.fire("fault", error_id, give_up)
        if give_up:
            log.error("engine failed %d times within %.0f s; not restarting", len(self._faults), self.limits.fault_window_s)
            return False
        with self._wake:
            self._wake.wait_for(lambda: self.state == "stopped", timeout=self.limits.restart_delay_s)
        self._set_state("serving")
        return self.state == "serving"
