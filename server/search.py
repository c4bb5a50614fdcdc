"""SearchWeights: composition weights fitted on a few examples, streamed as they improve.

Two methods over the same hidden group slot (the sources side by side): LoraHub's black-box
search (nevergrad; each batch of candidates a scoring job on the engine, run in token-bounded
pieces) and `learned` (Adam through the model; each piece of a step, examples within the engine's
`max_job_tokens`, forward and backward, one job on the engine thread), so streams keep flowing
between pieces. Both check their settings before any work, and when the client goes every queued
job of the call leaves the engine at once; they register the result only when they finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from adapter_fusion.adapters import Adapter
from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.errors import AlreadyExistsError, InvalidRequestError, RequestCancelledError
from adapter_fusion.coefficient_fit import CoefficientFit, learned_adapter, learned_settings
from adapter_fusion.lorahub import SearchProgress, SearchSettings, check_counts, search, weighted_objective
from adapter_fusion.merge import merge
from adapter_fusion.merge.learned import LearnedParams
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.names import hidden_name, not_hidden
from adapter_fusion.server.calls import Done, NameLocks, reports_of
from adapter_fusion.server.inference import tenant_of, when_done
from adapter_fusion.server.inputs import Inputs
from adapter_fusion.server.served import ServedModel, ServiceLimits
from adapter_fusion.server.store import check_name
from adapter_fusion.server.writes import AdapterWrites

METHODS = ("lorahub", "learned")


@dataclass
class Fitted:
    """A fit's outcome: the composition (not yet registered) and the stream's last message."""

    adapter: Adapter
    last: pb.SearchWeightsProgress


@dataclass
class Fitting:
    """What both methods get: the output name, the sources, the group slot holding them, the examples."""

    name: str
    sources: list[Adapter]
    group: str
    prompts: list[list[int]]
    targets: list[list[int]]
    tenant: str | None = None  # the caller's connection: whose turn its jobs take
    call: threading.Event = field(default_factory=threading.Event)  # shared by its engine jobs: set, they all leave


class Search:
    """SearchWeights: its settings checked, its sources in one hidden group slot, the fit streamed."""

    def __init__(self, *, engine: ServingEngine, writes: AdapterWrites, names: NameLocks, inputs: Inputs, model: ServedModel, limits: ServiceLimits) -> None:
        self.engine, self.writes, self.registry, self.names = engine, writes, writes.registry, names
        self.inputs, self.model, self.limits = inputs, model, limits

    def _lorahub_settings(self, request: pb.SearchWeightsRequest) -> SearchSettings:
        if request.per or request.HasField("lr") or request.batch_size:
            raise InvalidRequestError("per, lr and batch_size are settings of method 'learned'; lorahub takes budget, optimizer, parallel, l1, bound")
        budget = self.limits.under_cap("budget", request.budget or 40, self.limits.max_search_budget)
        optimizer, parallel = request.optimizer or "NGOpt", self.limits.under_cap("parallel", request.parallel or 1, self.limits.max_search_parallel)
        l1 = request.l1 if request.HasField("l1") else 0.05
        bound = request.bound if request.HasField("bound") else 1.5
        check_counts(len(request.adapters), len(request.examples))
        return SearchSettings(budget=budget, optimizer=optimizer, seed=request.seed, l1=l1, bound=bound, parallel=parallel)

    def _learned_settings(self, request: pb.SearchWeightsRequest) -> LearnedParams:
        if request.optimizer or request.parallel:
            raise InvalidRequestError("optimizer and parallel are settings of method 'lorahub'; learned takes budget (steps), per, lr, l1, bound, batch_size")
        steps = self.limits.check_learned(len(request.adapters), request.budget or 30, "budget")
        given = {"per": request.per or None, "steps": steps, "batch_size": request.batch_size or None}
        given |= {key: getattr(request, key) for key in ("lr", "l1", "bound") if request.HasField(key)}
        return learned_settings({k: v for k, v in given.items() if v is not None})

    async def search(self, request: pb.SearchWeightsRequest, context) -> AsyncIterator[pb.SearchWeightsProgress]:
        name = check_name(request.output_name)
        method = request.method or "lorahub"
        if method not in METHODS:
            raise InvalidRequestError(f"unknown method {method[:64]!r}; SearchWeights runs {' or '.join(METHODS)}")
        await self.writes.synced([name, *(not_hidden(a) for a in request.adapters)])
        if self.registry.has(name):
            raise AlreadyExistsError(f"adapter {name!r} already exists; pick another output_name")
        settings = self._lorahub_settings(request) if method == "lorahub" else self._learned_settings(request)
        sources = await in_thread(lambda: [self.registry.get(a) for a in request.adapters])  # NOT_FOUND before any work
        prompts, targets = await in_thread(self.inputs.example_ids, request.examples, request.raw, fit=True)
        group = hidden_name("search", hashlib.sha256(f"{name}/{time.time_ns()}".encode()).hexdigest()[:12])
        self.registry.register_group(group, sources)
        fitting = Fitting(name, sources, group, prompts, targets, tenant_of(context))
        when_done(context, lambda: self.engine.cancel(fitting.call))  # a cancelled stream: its queued jobs leave now
        try:
            fits = self._lorahub(request, settings, fitting) if method == "lorahub" else self._learned(request, settings, fitting)
            async with aclosing(fits):  # a client gone stops the fit now, not when the generator is collected
                async for item in fits:
                    if isinstance(item, pb.SearchWeightsProgress):
                        yield item
                        continue
                    info = AdapterInfo.of(item.adapter, f"{method} over {', '.join(request.adapters)}", request.pin)
                    async with self.names.hold(name):
                        await in_thread(self.writes.register_new, item.adapter, info)
                    item.last.adapter.CopyFrom(self.writes.info(name))
                    yield item.last
        finally:
            self.registry.unregister(group)

    async def _lorahub(self, request: pb.SearchWeightsRequest, settings: SearchSettings, fitting: Fitting) -> AsyncIterator[pb.SearchWeightsProgress | Fitted]:
        call = fitting.call  # shared by every evaluation's job: a cancel drops them all at once

        def nll(p, t, weights):
            return self.engine.score(fitting.group, p, t, weights, cancelled=call, tenant=fitting.tenant).future.result()

        def work(report: Callable[[SearchProgress], None]):
            objective = weighted_objective(nll, fitting.prompts, fitting.targets)
            return search(objective, len(fitting.sources), settings, on_progress=report, should_stop=call.is_set)

        try:
            async for item in reports_of(work):
                if not isinstance(item, Done):
                    yield pb.SearchWeightsProgress(evaluations=item.evaluations, best_loss=item.best_loss, best_weights=item.best_weights)
                    continue
                result = item.result
                adapter = (await in_thread(lambda: merge(fitting.sources, "linear", result.weights, name=fitting.name))).adapter
                adapter.extra["lorahub"] = {"weights": result.weights, "best_loss": result.best_loss, "sources": list(request.adapters)}
                yield Fitted(adapter, pb.SearchWeightsProgress(evaluations=len(result.losses), best_loss=result.best_loss, best_weights=result.weights))
        finally:
            self.engine.cancel(call)  # a cancelled call: its queued scoring leaves the engine now, the search stops

    async def _learned(self, request: pb.SearchWeightsRequest, p: LearnedParams, fitting: Fitting) -> AsyncIterator[pb.SearchWeightsProgress | Fitted]:
        zeros = [0.0] * len(fitting.sources)  # from 0, as LoraHub starts
        limits = self.model.limits
        longest = max(len(a) + len(b) for a, b in zip(fitting.prompts, fitting.targets))
        fit = CoefficientFit(  # each piece within the engine's token budget per job (one example at least)
            await in_thread(self.engine.job_runtime), fitting.sources, fitting.prompts, fitting.targets, p,
            init=zeros, seed=request.seed, chunk_rows=max(1, min(limits.max_batch, limits.max_job_tokens // longest)),
        )
        call = fitting.call

        def run(piece: Callable[[int], None]) -> Callable:
            def work(route, job) -> None:
                if job.cancelled.is_set():
                    raise RequestCancelledError("fitting abandoned: the client cancelled or its deadline passed")
                piece(route)

            return work

        for done in range(1, p.steps + 1):
            for piece in fit.pieces():  # each a job between decode steps: streams keep flowing
                job = self.engine.run(fitting.group, run(piece), cancelled=call, tenant=fitting.tenant)
                try:
                    await asyncio.wrap_future(job.future)
                finally:
                    if not job.future.done():
                        self.engine.cancel(call)  # a client gone: the piece not yet started never runs
            yield pb.SearchWeightsProgress(evaluations=done, best_loss=fit.result.best_loss, best_weights=fit.source_weights())
        result = fit.finish()
        adapter = (await in_thread(lambda: learned_adapter(fitting.sources, result, p, zeros, seed=request.seed, name=fitting.name))).adapter
        yield Fitted(adapter, pb.SearchWeightsProgress(evaluations=p.steps, best_loss=result.best_loss, best_weights=fit.source_weights()))
