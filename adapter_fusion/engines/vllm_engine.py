"""vLLM as the serving engine behind the same gRPC API (`engines.base.ServingEngine`).

vLLM's `LLMEngine` runs in this process (no engine-core child: nothing outlives the server, and an
idle engine does not spin, since nothing steps it), owned by one thread as our builtin engine's
model is: commands (add, abort, drop a LoRA) reach it through an inbox, and it steps only while
requests are in flight. Preparing a request's LoRA (writing a PEFT dir, composing a mix) runs on
preparing threads, off the engine thread and off the event loop (`vllm_loras.LoraTable`), shared
fairly between tenants (`vllm_prepare.PrepareQueue`). `hooks` fires the builtin engine's phases
where vLLM has them (admitted, forward) and `preparing` on a preparing thread.

Generation streams vLLM's deltas as our events (stop tokens dropped from the ids, as ours do);
Score sums vLLM's prompt logprobs over each target; `run` work (learned fits) executes on a private
transformers copy of the base (`job_runtime`), loaded on first use. An exception on the engine
thread is fatal: every request held ends with an error and the state is "failed" (NOT_SERVING;
the server exits non-zero), never a hang.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from pathlib import Path

import torch

from adapter_fusion.decoding import Request
from adapter_fusion.encoding import Encoder
from adapter_fusion.engines.base import check_examples
from adapter_fusion.engines.hooks import EngineHooks
from adapter_fusion.engines.job_model import JobModel
from adapter_fusion.engines.lifecycle import Lifecycle
from adapter_fusion.engines.vllm_loras import Lora, LoraTable
from adapter_fusion.engines.vllm_prepare import PrepareQueue, preparing_error
from adapter_fusion.engines.vllm_scores import ScoreRows, Scoring
from adapter_fusion.engines.vllm_streams import InFlight, Live, event_of
from adapter_fusion.engines.vllm_setup import VllmSettings, check_rank, lora_request, sampling_params, start_vllm
from adapter_fusion.entries import Choice, Hold
from adapter_fusion.errors import AdapterFusionError, EngineFaultError, InvalidRequestError, RequestCancelledError, ShuttingDownError, new_error_id
from adapter_fusion.limits import Limits
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.targets import check_targets, projection_shapes
from adapter_fusion.work import CANCELLED, Event, Job

log = logging.getLogger("adapter_fusion.engine")


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        base_dir: str | Path,
        limits: Limits = Limits(),
        settings: VllmSettings = VllmSettings(),
        reload: Callable | None = None,
        on_state: Callable[[str], None] | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.base_dir, self.limits, self.settings = Path(base_dir), limits, settings
        self.encoder = Encoder(self.base_dir)
        self.shapes = projection_shapes(self.base_dir)
        # vLLM holds its LoRA buffers itself (max_loras x max_lora_rank, preallocated): the budget counts our factors
        self.registry = AdapterRegistry(self.check, lambda slots: 0, limits.memory_budget_bytes, reload)
        self._dir = tempfile.TemporaryDirectory(prefix="adapter-fusion-vllm-")
        self.loras = LoraTable(Path(self._dir.name), settings.max_lora_rank, settings.max_mixes)
        self.llm = start_vllm(self.base_dir, limits, settings, sorted({p.rsplit(".", 1)[-1] for p in self.shapes}), dtype, device)
        # our own models' device (learned fits, data compositions): cuda:N is now the one GPU left visible
        self.device = "cuda" if device is not None and device.startswith("cuda:") else device
        self.stats = {"tokens": 0, "requests": 0, "faults": 0, "batch_size": 0}
        self._wake = threading.Condition()
        self.hooks = EngineHooks()
        self.life = Lifecycle(self._wake, self._run, "adapter-fusion-vllm", on_state, failed="down after a fault (vLLM's state is unknown)")
        self._inbox: list[Callable[[], None]] = []
        self._live: dict[str, Live] = {}  # vLLM id -> generation (engine thread only)
        self._held: set[Live] = set()  # every generation submitted and not ended
        self._held_jobs: set[Job] = set()
        self._in_flight = InFlight(limits)
        self._ids = itertools.count()
        self._scores = ScoreRows(self.llm, self._ids, self._end_job, CANCELLED)  # Score jobs, row by row
        self._prepare = PrepareQueue(2, "vllm-prepare")
        self.job_model = JobModel(self.base_dir, self.device)  # learned fits: a private transformers copy, loaded on first use

    # ---- adapters ------------------------------------------------------------------------------

    def check(self, adapter) -> None:
        """Refuse what this model or vLLM's LoRA buffers cannot hold."""
        check_targets(adapter, self.shapes)
        check_rank(adapter, self.settings)

    def _lora_for(self, hold: Hold, row_weights: list[float] | None = None) -> Lora | None:
        return self.loras.for_hold(self.registry, hold, row_weights)

    # ---- requests (any thread) -----------------------------------------------------------------

    def check_room(self, tenant: Hashable = None) -> None:
        with self._wake:
            self.life.check_open()
            self._in_flight.check(tenant)

    def submit(self, request: Request, adapter: Choice | Hold, emit: Callable[[Event], None], tenant: Hashable = None) -> Request:
        self.limits.check(request)
        hold = self.registry.held(adapter)
        with self._wake:
            try:
                self.life.check_open()
                self._in_flight.check(tenant)
            except AdapterFusionError:
                if hold is not adapter:  # a hold handed over stays the caller's when refused
                    self.registry.release(hold)
                raise
            self._in_flight.add(tenant)
            live = Live(request, hold, emit, tenant)
            self._held.add(live)
        self._prepare.submit(tenant, lambda: self._prepared(live))
        return request

    def cancel_request(self, request: Request) -> None:
        request.cancelled = True
        self._post(lambda: self._abort(request))

    def score(self, adapter: Choice, prompts, targets, source_weights: torch.Tensor | None = None, cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        check_examples(prompts, targets)
        job = self._new_job(adapter, cancelled, tenant)

        def prepare() -> None:
            weights = [None] * len(prompts) if source_weights is None else source_weights.tolist()
            try:
                scoring = Scoring(job, targets, self.loras.for_rows(self.registry, job.hold, weights))
            except Exception as error:
                return self._end_job(job, preparing_error(error))
            self._post(lambda: self._scores.add(scoring, prompts))

        self._prepare.submit(job.tenant, prepare)
        return job

    def run(self, adapter: Choice, work: Callable[[object, Job], object], cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        job = self._new_job(adapter, cancelled, tenant)
        self.job_model.run(job, work, self._end_job, CANCELLED)
        return job

    def job_runtime(self) -> Runtime:
        return self.job_model.runtime()

    def cancel(self, cancelled: threading.Event) -> None:
        cancelled.set()
        self._post(lambda: self._scores.cancel(cancelled))

    def lora_ids(self, timeout: float = 60) -> set[int]:
        """The LoRA ids vLLM holds now (asked on the engine thread, after it has dropped freed ones)."""
        answer: Future = Future()
        self._post(lambda: (self._drop_freed(), answer.set_result(self.llm.list_loras())))
        return answer.result(timeout)

    @property
    def queue_depth(self) -> int:
        with self._wake:
            return len(self._in_flight) - len(self._live)

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.life.state

    def start(self) -> None:
        self.life.start()

    def stop(self) -> None:
        self.life.halt()
        self._prepare.close()
        self.job_model.stop()
        self._end_all(ShuttingDownError("the server stopped before this request finished; retry on another replica"))
        self.llm.engine_core.shutdown()
        self._dir.cleanup()
        self.life.on_state("stopped")

    # ---- preparing (worker threads) ------------------------------------------------------------

    def _prepared(self, live: Live) -> None:
        try:
            if not live.request.cancelled:
                self.hooks.fire("preparing", live.request)
                live.lora = self._lora_for(live.hold)
        except Exception as error:  # over budget, a mix too large, a disk error: that request fails
            self._end(live, Event(error=preparing_error(error)))
            return
        self._post(lambda: self._add(live))

    def _new_job(self, adapter: Choice, cancelled: threading.Event | None, tenant: Hashable) -> Job:
        cancelled = cancelled or threading.Event()
        if cancelled.is_set():
            raise RequestCancelledError(CANCELLED)
        job = Job(self.registry.held(adapter), [], lambda: None, cancelled, tenant)
        with self._wake:
            try:
                self.life.check_open()
            except AdapterFusionError:
                if job.hold is not adapter:
                    self.registry.release(job.hold)
                raise
            self._held_jobs.add(job)
        return job

    # ---- the engine thread ---------------------------------------------------------------------

    def _post(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    if not (self._inbox or self._live or self._scores) and self.state == "serving":
                        self._wake.wait(timeout=1.0)  # idle: wake now and then to drop LoRAs the registry freed
                    if self.state != "serving":
                        return
                    commands, self._inbox = self._inbox, []
                self._drop_freed()  # first: a LoRA id removed before a command adds a request with it again
                for command in commands:
                    command()
                if self.llm.has_unfinished_requests():
                    self.stats["batch_size"] = len(self._live)
                    self.hooks.fire("forward", "step")
                    for output in self.llm.step():
                        self._deliver(output)
                    self.stats["batch_size"] = len(self._live)
        except Exception as error:  # a fault: vLLM's state is unknown, so the engine is down for good
            error_id = new_error_id()
            log.error("vLLM engine fault (error id %s); ending every request it held", error_id, exc_info=error)
            self.stats["faults"] += 1
            self.life.set("failed")
            self._end_all(EngineFaultError(error_id))

    def _drop_freed(self) -> None:
        for slot, sources in self.registry.take_slot_changes():
            if sources is None:
                self.loras.slot_freed(slot)
        for lora_id in self.loras.take_removed():
            self.llm.remove_lora(lora_id)

    def _add(self, live: Live) -> None:
        if live.request.cancelled:
            return self._end(live, Event(finish_reason="cancelled"))
        rid = f"g{next(self._ids)}"
        try:
            self.llm.add_request(rid, {"prompt_token_ids": live.request.prompt_ids}, sampling_params(live.request, self.encoder.stop_ids), lora_request=lora_request(live.lora))
        except (ValueError, TypeError) as error:  # vLLM refused the request itself (e.g. over max_model_len)
            return self._end(live, Event(error=InvalidRequestError(f"vLLM refused the request: {error}")))
        live.request.route = rid
        self._live[rid] = live
        self.stats["requests"] += 1
        self.hooks.fire("admitted", [live.request])

    def _deliver(self, output) -> None:
        if output.request_id in self._scores:
            return self._scores.deliver(output)
        live = self._live.get(output.request_id)
        if live is None:
            return
        tokens = live.completion
        event = event_of(live, output, self.encoder.stop_ids)
        self.stats["tokens"] += live.completion - tokens
        if event is not None and event.finish_reason is None:
            live.emit(event)
        elif event is not None:
            self._end(live, event)

    def _abort(self, request: Request) -> None:
        rid = request.route if isinstance(request.route, str) else None
        live = self._live.get(rid) if rid is not None else None
        if live is not None:
            self.llm.abort_request([rid])
            self._end(live, Event(finish_reason="cancelled"))

    def _end(self, live: Live, event: Event) -> None:
        """Send a request's last event and let go of what it held, once."""
        with self._wake:  # a preparing thread and the engine thread (a fault) may both end one
            if live.ended:
                return
            live.ended = True
            self._held.discard(live)
            self._in_flight.add(live.tenant, -1)
        if live.lora is not None:
            self.loras.release(live.lora)
        self.registry.release(live.hold)
        if isinstance(live.request.route, str):
            self._live.pop(live.request.route, None)
        live.request.finish_reason = event.finish_reason or live.request.finish_reason
        live.emit(event)

    def _end_job(self, job: Job, error: Exception | None = None, scoring: Scoring | None = None) -> None:
        with self._wake:
            if job.released:
                return
            job.released = True
            self._held_jobs.discard(job)
        if error is not None:
            job.fail(error)
        for lora in filter(None, scoring.loras if scoring is not None else []):
            self.loras.release(lora)
        self.registry.release(job.hold)

    def _end_all(self, error: Exception) -> None:
        """Every request and job held ends with `error` (after a fault, or at stop)."""
        with self._wake:
            self._inbox.clear()  # queued adds never reach vLLM: their requests end here
            lives, jobs = list(self._held), list(self._held_jobs)
        scorings = self._scores.take_all()
        for live in lives:
            self._end(live, Event(error=error))
        for job in jobs:
            self._end_job(job, error, scorings.get(job))
