"""vLLM as the serving engine behind the same gRPC API (`engines.base.ServingEngine`).

vLLM's `LLMEngine` runs in this process (no engine-core child: nothing outlives the server, and an
idle engine does not spin, since nothing steps it), owned by one thread as our builtin engine's
model is: commands (add, abort, drop a LoRA) reach it through an inbox, and it steps only while
requests are in flight. Preparing a request's LoRA (writing a PEFT dir, composing a mix) runs on
preparing threads, off the engine thread and off the event loop (`vllm_loras.LoraTable`).

Generation streams vLLM's deltas as our events (stop tokens dropped from the ids, as ours do);
Score sums vLLM's prompt logprobs over each target; `run` work (learned fits) executes on a private
transformers copy of the base (`job_runtime`), loaded on first use. An exception on the engine
thread is fatal: every request held ends with an error and the state is "failed" (NOT_SERVING;
the server exits non-zero), never a hang.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_fusion.decoding import Request
from adapter_fusion.encoding import Encoder
from adapter_fusion.engines.vllm_loras import Lora, LoraTable
from adapter_fusion.entries import Choice, Hold
from adapter_fusion.errors import (
    AdapterFusionError, EngineFaultError, IncompatibleAdaptersError, InvalidRequestError, LimitExceededError,
    RequestCancelledError, ShuttingDownError, UnavailableError, new_error_id,
)
from adapter_fusion.limits import Limits
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.runtime import Runtime
from adapter_fusion.targets import check_targets, projection_shapes
from adapter_fusion.vllm_env import cpu_environment
from adapter_fusion.work import Event, Job

log = logging.getLogger("adapter_fusion.engine")
CANCELLED = "abandoned: the client cancelled or its deadline passed"


@dataclass(frozen=True)
class VllmSettings:
    """The vLLM knobs a serving team sets (`serve --engine vllm`)."""

    max_loras: int = 8  # distinct LoRAs in one batch
    max_lora_rank: int = 16  # a larger adapter is refused; a larger mix is truncated to it (SVD, error reported)
    max_cpu_loras: int | None = None  # LoRAs vLLM keeps in host memory (None: vLLM's default, max_loras)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's
    tensor_parallel_size: int = 1
    max_mixes: int = 32  # weighted mixes kept as LoRAs, least recently used dropped


@dataclass(eq=False)
class Live:
    """A generation in flight: its request, what it holds, its vLLM id and LoRA."""

    request: Request
    hold: Hold
    emit: Callable[[Event], None]
    tenant: Hashable
    lora: Lora | None = None
    completion: int = 0
    ended: bool = False


@dataclass(eq=False)
class Scoring:
    """A Score job: one vLLM request per example, each with its LoRA; the sums arrive by row."""

    job: Job
    targets: list[list[int]]
    loras: list[Lora | None]
    nll: dict[int, float] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)


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
        self.base_dir, self.limits, self.settings, self.device = Path(base_dir), limits, settings, device
        self.encoder = Encoder(self.base_dir)
        self.shapes = projection_shapes(self.base_dir)
        # vLLM holds its LoRA buffers itself (max_loras x max_lora_rank, preallocated): the budget counts our factors
        self.registry = AdapterRegistry(self.check, lambda slots: 0, limits.memory_budget_bytes, reload)
        self._dir = tempfile.TemporaryDirectory(prefix="adapter-fusion-vllm-")
        self.loras = LoraTable(Path(self._dir.name), settings.max_lora_rank, settings.max_mixes)
        self.llm = _start_vllm(self.base_dir, limits, settings, sorted({p.rsplit(".", 1)[-1] for p in self.shapes}), dtype)
        self.on_state = on_state or (lambda state: None)
        self.state = "starting"
        self.stats = {"tokens": 0, "requests": 0, "faults": 0, "batch_size": 0}
        self._wake = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._live: dict[str, Live] = {}  # vLLM id -> generation (engine thread only)
        self._held: set[Live] = set()  # every generation submitted and not ended
        self._held_jobs: set[Job] = set()
        self._scores: dict[str, tuple[Scoring, int]] = {}  # vLLM id -> (its job, its row)
        self._in_flight: Counter = Counter()  # generations per tenant, submitted and not ended (None: all)
        self._ids = itertools.count()
        self._prepare = ThreadPoolExecutor(2, thread_name_prefix="vllm-prepare")
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="vllm-jobs")
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="adapter-fusion-vllm", daemon=True)

    # ---- adapters ------------------------------------------------------------------------------

    def check(self, adapter) -> None:
        """Refuse what this model or vLLM's LoRA buffers cannot hold."""
        check_targets(adapter, self.shapes)
        rank = max(adapter.ranks.values(), default=0)
        if rank > self.settings.max_lora_rank:
            raise IncompatibleAdaptersError(
                f"adapter {adapter.name!r} has rank {rank}, over this vLLM engine's --max-lora-rank {self.settings.max_lora_rank}; "
                "restart with a larger --max-lora-rank, or compose it with `rank` set"
            )

    def _lora_for(self, hold: Hold, row_weights: list[float] | None = None) -> Lora | None:
        """The LoRA a held choice runs as (None: the base model); may write or compose (not on the engine thread)."""
        if not hold.entries:
            return None
        slots = [self.registry.slot_for(entry) for entry in hold.entries]  # resident (reloaded), within the budget
        if hold.weights is None and row_weights is None:
            return self.loras.single(slots[0], hold.entries[0])
        if row_weights is not None:  # a search group: one weight per source
            return self.loras.mix([(hold.entries[0], row_weights)])
        return self.loras.mix([(e, [w] * len(e.sources)) for e, w in zip(hold.entries, hold.weights)])

    # ---- requests (any thread) -----------------------------------------------------------------

    def check_room(self, tenant: Hashable = None) -> None:
        with self._wake:
            self._check_open()
            self._check_room(tenant)

    def _check_room(self, tenant: Hashable) -> None:  # lock held
        total, mine = self.limits.max_queue + self.limits.max_batch, self.limits.tenant_queue + self.limits.tenant_rows
        if self._in_flight[None] >= total:
            raise LimitExceededError(f"the engine is full ({total} requests in flight); retry later")
        if tenant is not None and self._in_flight[tenant] >= mine:
            raise LimitExceededError(f"this connection already has {mine} requests in flight, its share; wait for some to finish, then retry")

    def submit(self, request: Request, adapter: Choice | Hold, emit: Callable[[Event], None], tenant: Hashable = None) -> Request:
        self.limits.check(request)
        hold = self.registry.held(adapter)
        with self._wake:
            try:
                self._check_open()
                self._check_room(tenant)
            except AdapterFusionError:
                if hold is not adapter:  # a hold handed over stays the caller's when refused
                    self.registry.release(hold)
                raise
            self._in_flight.update([None, tenant] if tenant is not None else [None])
            live = Live(request, hold, emit, tenant)
            self._held.add(live)
        self._prepare.submit(self._prepared, live)
        return request

    def cancel_request(self, request: Request) -> None:
        request.cancelled = True
        self._post(lambda: self._abort(request))

    def score(self, adapter: Choice, prompts, targets, source_weights: torch.Tensor | None = None, cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        if not prompts or len(prompts) != len(targets):
            raise InvalidRequestError(f"scoring needs at least one example, each with a target (got {len(prompts)} inputs, {len(targets)} targets)")
        if any(not p for p in prompts) or any(not t for t in targets):
            raise InvalidRequestError("every example needs a non-empty input and target (after tokenising)")
        job = self._new_job(adapter, cancelled, tenant)

        def prepare() -> None:
            weights = [None] * len(prompts) if source_weights is None else source_weights.tolist()
            try:
                loras = [self._lora_for(job.hold, w) for w in weights]
            except AdapterFusionError as error:
                self._end_job(job, error=error)
                return
            scoring = Scoring(job, targets, loras)
            self._post(lambda: self._add_scoring(scoring, prompts))

        self._prepare.submit(prepare)
        return job

    def run(self, adapter: Choice, work: Callable[[object, Job], object], cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        job = self._new_job(adapter, cancelled, tenant)

        def execute() -> None:
            if not job.future.set_running_or_notify_cancel():
                return self._end_job(job)
            try:
                if job.cancelled.is_set():
                    raise RequestCancelledError(CANCELLED)
                runtime = self.job_runtime()
                runtime.set_slots([job.hold.entries[0].sources] if job.hold.entries else [])
                job.future.set_result(work(1 if job.hold.entries else 0, job))
            except BaseException as error:  # its caller sees it: the engine goes on
                job.future.set_exception(error)
            finally:
                self._end_job(job)

        self._jobs.submit(execute)
        return job

    def job_runtime(self) -> Runtime:
        with self._runtime_lock:  # a search asks from a worker thread, its pieces from the jobs thread
            if self._runtime is None:
                self._runtime = Runtime(self.base_dir, device=self.device, slot_columns=8)
            return self._runtime

    def cancel(self, cancelled: threading.Event) -> None:
        cancelled.set()
        self._post(lambda: self._abort_jobs(cancelled))

    def lora_ids(self, timeout: float = 60) -> set[int]:
        """The LoRA ids vLLM holds now (asked on the engine thread, after it has dropped freed ones)."""
        answer: Future = Future()
        self._post(lambda: (self._drop_freed(), answer.set_result(self.llm.list_loras())))
        return answer.result(timeout)

    @property
    def queue_depth(self) -> int:
        with self._wake:
            return self._in_flight[None] - len(self._live)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._set_state("serving")
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            if self.state != "failed":
                self.state = "stopped"
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._prepare.shutdown(wait=True, cancel_futures=True)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self._end_all(ShuttingDownError("the server stopped before this request finished; retry on another replica"))
        self.llm.engine_core.shutdown()
        self._dir.cleanup()
        self.on_state("stopped")

    def _set_state(self, state: str) -> None:
        with self._wake:
            if self.state == "stopped":
                return
            self.state = state
        self.on_state(state)

    def _check_open(self) -> None:  # lock held
        if self.state != "serving":
            reason = {"failed": "down after a fault"}.get(self.state, self.state)
            raise (ShuttingDownError if self.state == "stopped" else UnavailableError)(f"the serving engine is {reason}; retry on another replica")

    # ---- preparing (worker threads) ------------------------------------------------------------

    def _prepared(self, live: Live) -> None:
        try:
            if not live.request.cancelled:
                live.lora = self._lora_for(live.hold)
        except AdapterFusionError as error:  # over budget, a mix too large: that request fails
            self._end(live, Event(error=error))
            return
        self._post(lambda: self._add(live))

    def _new_job(self, adapter: Choice, cancelled: threading.Event | None, tenant: Hashable) -> Job:
        cancelled = cancelled or threading.Event()
        if cancelled.is_set():
            raise RequestCancelledError(CANCELLED)
        job = Job(self.registry.held(adapter), [], lambda: None, cancelled, tenant)
        with self._wake:
            try:
                self._check_open()
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
                for command in commands:
                    command()
                self._drop_freed()
                if self.llm.has_unfinished_requests():
                    for output in self.llm.step():
                        self._deliver(output)
                    self.stats["batch_size"] = len(self._live)
        except Exception as error:  # a fault: vLLM's state is unknown, so the engine is down for good
            error_id = new_error_id()
            log.error("vLLM engine fault (error id %s); ending every request it held", error_id, exc_info=error)
            self.stats["faults"] += 1
            self._set_state("failed")
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
            self.llm.add_request(rid, {"prompt_token_ids": live.request.prompt_ids}, self._sampling(live.request), lora_request=_lora_request(live.lora))
        except (ValueError, TypeError) as error:  # vLLM refused the request itself (e.g. over max_model_len)
            return self._end(live, Event(error=InvalidRequestError(f"vLLM refused the request: {error}")))
        live.request.route = rid
        self._live[rid] = live
        self.stats["requests"] += 1

    def _sampling(self, request: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k or -1,
            seed=request.seed if request.temperature > 0 else None, stop=list(request.stop) or None,
            stop_token_ids=sorted(self.encoder.stop_ids), output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
        )

    def _deliver(self, output) -> None:
        if output.request_id in self._scores:
            return self._deliver_score(output)
        live = self._live.get(output.request_id)
        if live is None:
            return
        done = output.outputs[0]
        ids = tuple(done.token_ids)
        if output.finished and done.finish_reason == "stop" and ids and ids[-1] in self.encoder.stop_ids:
            ids = ids[:-1]  # the stop token is not output (as the builtin engine's)
        live.completion += len(ids)
        self.stats["tokens"] += len(ids)
        if not output.finished:
            if done.text or ids:
                live.emit(Event(done.text, ids))
            return
        reason = {"abort": "cancelled"}.get(done.finish_reason, done.finish_reason)
        if reason == "cancelled":
            return self._end(live, Event(finish_reason="cancelled"))
        error = live.lora.relative_error if live.lora is not None else 0.0
        self._end(live, Event(done.text, ids, reason, len(live.request.prompt_ids), live.completion, mix_error=error))

    def _abort(self, request: Request) -> None:
        rid = request.route if isinstance(request.route, str) else None
        live = self._live.get(rid) if rid is not None else None
        if live is not None:
            self.llm.abort_request([rid])
            self._end(live, Event(finish_reason="cancelled"))

    def _end(self, live: Live, event: Event) -> None:
        """Send a request's last event and let go of what it held, once."""
        if live.ended:
            return
        live.ended = True
        if isinstance(live.request.route, str):
            self._live.pop(live.request.route, None)
        with self._wake:
            self._held.discard(live)
            self._in_flight.subtract([None, live.tenant] if live.tenant is not None else [None])
        if live.lora is not None:
            self.loras.release(live.lora)
        self.registry.release(live.hold)
        live.request.finish_reason = event.finish_reason or live.request.finish_reason
        live.emit(event)

    # ---- scoring on the engine thread ------------------------------------------------------------

    def _add_scoring(self, scoring: Scoring, prompts: list[list[int]]) -> None:
        from vllm import SamplingParams

        job = scoring.job
        if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
            return self._end_job(job, RequestCancelledError(CANCELLED), scoring)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        for row, (prompt, target) in enumerate(zip(prompts, scoring.targets)):
            rid = f"s{next(self._ids)}"
            try:
                self.llm.add_request(rid, {"prompt_token_ids": prompt + target}, params, lora_request=_lora_request(scoring.loras[row]))
            except (ValueError, TypeError) as error:
                self._abort_scoring(scoring)
                return self._end_job(job, InvalidRequestError(f"vLLM refused example {row}: {error}"), scoring)
            scoring.ids.append(rid)
            self._scores[rid] = (scoring, row)

    def _deliver_score(self, output) -> None:
        scoring, row = self._scores.pop(output.request_id)
        if not output.finished or scoring.job.future.done():
            return
        target = scoring.targets[row]
        start = len(output.prompt_token_ids) - len(target)
        # prompt_logprobs[i]: {token i: its logprob given tokens < i} (entry 0 is None)
        scoring.nll[row] = -sum(output.prompt_logprobs[start + j][token].logprob for j, token in enumerate(target))
        if len(scoring.nll) == len(scoring.targets):
            scoring.job.future.set_result(torch.tensor([scoring.nll[r] for r in range(len(scoring.targets))], dtype=torch.float64))
            self._end_job(scoring.job, scoring=scoring)

    def _abort_jobs(self, cancelled: threading.Event) -> None:
        for scoring in {s for s, _ in self._scores.values() if s.job.cancelled is cancelled}:
            self._abort_scoring(scoring)
            self._end_job(scoring.job, RequestCancelledError(CANCELLED), scoring)

    def _abort_scoring(self, scoring: Scoring) -> None:
        live = [rid for rid in scoring.ids if self._scores.pop(rid, None) is not None]
        if live:
            self.llm.abort_request(live)

    def _end_job(self, job: Job, error: Exception | None = None, scoring: Scoring | None = None) -> None:
        with self._wake:
            if job.released:
                return
            job.released = True
            self._held_jobs.discard(job)
        if error is not None and not job.future.done():
            try:
                job.future.set_exception(error)
            except Exception:  # cancelled by its caller meanwhile
                pass
        for lora in scoring.loras if scoring is not None else []:
            if lora is not None:
                self.loras.release(lora)
        self.registry.release(job.hold)

    def _end_all(self, error: Exception) -> None:
        """Every request and job held ends with `error` (after a fault, or at stop)."""
        with self._wake:
            self._inbox.clear()  # queued adds never reach vLLM: their requests end here
            lives, jobs = list(self._held), list(self._held_jobs)
        scorings = {s.job: s for s, _ in self._scores.values()}
        self._scores.clear()
        for live in lives:
            self._end(live, Event(error=error))
        for job in jobs:
            self._end_job(job, error, scorings.get(job))


def _lora_request(lora: Lora | None):
    if lora is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora.name, lora.lora_id, str(lora.path))


def _start_vllm(base_dir: Path, limits: Limits, settings: VllmSettings, targets: list[str], dtype: str | None):
    """vLLM's engine in this process, configured for this machine (`vllm_env.cpu_environment`)."""
    for key, value in cpu_environment().items():
        os.environ.setdefault(key, value)  # read by vLLM's CPU platform only
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if settings.tensor_parallel_size == 1 else "1")
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(base_dir), dtype=dtype or "auto", enable_lora=True, max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, max_cpu_loras=settings.max_cpu_loras,
        lora_target_modules=targets,  # never the output head: its LoRA wrapper breaks prompt logprobs
        gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size, max_num_seqs=limits.max_batch, disable_log_stats=True,
    )
    return LLMEngine.from_engine_args(args)
