"""The AdapterFusion servicer: proto <-> library, path confinement, errors to status codes.

No maths here: loading, merging, exporting and baking are library calls run in worker threads;
generation and scoring go to the engine, whose thread owns the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from adapter_fusion.adapters import load_adapter, save_adapter
from adapter_fusion.bake import bake
from adapter_fusion.engine import AdapterInfo, Engine, Event
from adapter_fusion.errors import AlreadyExistsError, InvalidRequestError, LimitExceededError, PathNotAllowedError, ShuttingDownError
from adapter_fusion.lorahub import SearchProgress, check_settings, search, weighted_objective
from adapter_fusion.merge import merge
from adapter_fusion.recipe import parse_recipe
from adapter_fusion.runtime import Request
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from server.errors import status_of
from server.store import AdapterStore, check_name

log = logging.getLogger("adapter_fusion.server")


@dataclass(frozen=True)
class ServiceLimits:
    max_score_examples: int = 256
    inline_cache_size: int = 16  # inline compositions kept, least recently used dropped
    max_search_budget: int = 1000  # SearchWeights evaluations


@dataclass
class Observer:
    """Hooks for metrics; no-ops by default so the service does not depend on prometheus."""

    rpc_done: Callable[[str, str, float], None] = lambda method, code, seconds: None
    first_token: Callable[[float], None] = lambda seconds: None


def confine(path: str, roots: list[Path]) -> Path:
    """Resolve `path` (relative ones against the first root), following `..` and symlinks, and
    refuse it unless it lies under one of `roots`."""
    if not path:
        raise InvalidRequestError("path is empty")
    if not roots:
        raise PathNotAllowedError("this server allows no adapter paths (start it with --adapter-root)")
    candidate = Path(path) if Path(path).is_absolute() else roots[0] / path
    real = candidate.resolve()
    for root in roots:
        if real == root.resolve() or real.is_relative_to(root.resolve()):
            return real
    allowed = ", ".join(str(r) for r in roots)
    raise PathNotAllowedError(f"{path} resolves to {real}, outside the allowed roots ({allowed})")


@dataclass(frozen=True)
class _Done:
    result: Any


async def _reports_of(work: Callable[[Callable[[Any], None]], Any]) -> AsyncIterator[Any]:
    """Run work(report) in a thread; yield each item it reports as it comes, then _Done(result)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(asyncio.to_thread(work, lambda item: loop.call_soon_threadsafe(updates.put_nowait, item)))
    while not task.done() or not updates.empty():
        getter = asyncio.ensure_future(updates.get())
        done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
        else:
            getter.cancel()
    yield _Done(task.result())


def recipe_dict(recipe: pb.Recipe) -> dict:
    sources = [{"adapter": s.adapter, "weight": s.weight if s.HasField("weight") else 1.0} for s in recipe.sources]
    out = {
        "method": recipe.method,
        "sources": sources,
        "parameters": {**dict(recipe.parameters), **dict(recipe.options)},
        "seed": recipe.seed,
    }
    if recipe.HasField("rank"):
        out["rank"] = recipe.rank
    return out


def info_message(info: AdapterInfo, resident: bool) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=info.name,
        rank=info.rank,
        target_modules=info.target_modules,
        size_bytes=info.size_bytes,
        source=info.source,
        pinned=info.pinned,
        resident=resident,
        base_model=info.base_model or "",
    )


class AdapterFusionService(pb_grpc.AdapterFusionServicer):
    def __init__(
        self,
        engine: Engine,
        store: AdapterStore,
        roots: list[Path],
        limits: ServiceLimits = ServiceLimits(),
        observer: Observer | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.roots = roots
        self.limits = limits
        self.observer = observer or Observer()
        self._inline: OrderedDict[str, str] = OrderedDict()  # canonical recipe hash -> hidden adapter name
        self.in_flight = 0  # calls being handled: a drain waits for them
        self.draining = False
        self._inline_lock = asyncio.Lock()

    # ---- plumbing ------------------------------------------------------------------------------

    async def _abort(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error", exc_info=error)
            await context.abort(code, f"internal error ({type(error).__name__}: {error}); please report it")
        await context.abort(code, str(error))

    def _enter(self) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        self.in_flight += 1

    async def _unary(self, method: str, context, work):
        start = time.perf_counter()
        try:
            self._enter()
        except ShuttingDownError as error:
            await self._abort(context, error)
        try:
            result = await work()
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            self.observer.rpc_done(method, "CANCELLED", time.perf_counter() - start)
            raise
        except Exception as error:
            self.observer.rpc_done(method, status_of(error).name, time.perf_counter() - start)
            await self._abort(context, error)
        finally:
            self.in_flight -= 1
        self.observer.rpc_done(method, "OK", time.perf_counter() - start)
        return result

    async def _streaming(self, method: str, context, messages: AsyncIterator) -> AsyncIterator:
        """Forward a handler's messages; map its errors to status codes and report the outcome."""
        start = time.perf_counter()
        code = "OK"
        try:
            self._enter()
        except ShuttingDownError as error:
            await self._abort(context, error)
        try:
            async for message in messages:
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            code = status_of(error).name
            await self._abort(context, error)
        finally:
            self.in_flight -= 1
            self.observer.rpc_done(method, code, time.perf_counter() - start)

    def _entries_info(self, name: str) -> pb.AdapterInfo:
        for info, resident in self.engine.adapters(include_hidden=True):
            if info.name == name:
                return info_message(info, resident)
        raise AssertionError(name)  # registered just before: a bug if missing

    # ---- registry ------------------------------------------------------------------------------

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.AdapterInfo:
        async def work() -> pb.AdapterInfo:
            name = check_name(request.name)
            path = confine(request.path, self.roots)
            adapter = await asyncio.to_thread(load_adapter, path, name)
            info = AdapterInfo.of(adapter, str(path), request.pin)
            if self.engine.has(name):  # idempotent for the same path, ALREADY_EXISTS otherwise
                return info_message(self.engine.register(adapter, info), True)
            self.engine.register(adapter, info)  # checks shapes and the memory budget first
            await self._persist(adapter, info)
            return self._entries_info(name)

        return await self._unary("LoadAdapter", context, work)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        async def work() -> pb.UnloadAdapterResponse:
            self.engine.unregister(request.name)
            await asyncio.to_thread(self.store.delete, request.name)
            return pb.UnloadAdapterResponse()

        return await self._unary("UnloadAdapter", context, work)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        async def work() -> pb.ListAdaptersResponse:
            rows = sorted(self.engine.adapters(), key=lambda row: row[0].name)
            return pb.ListAdaptersResponse(adapters=[info_message(i, r) for i, r in rows])

        return await self._unary("ListAdapters", context, work)

    async def _compose(self, name: str, recipe: pb.Recipe, pin: bool, hidden: bool, persist: bool):
        spec = parse_recipe(recipe_dict(recipe))  # INVALID_ARGUMENT before any work
        sources = [self.engine.get(s.adapter) for s in spec.sources]
        result = await asyncio.to_thread(
            merge, sources, spec.method, spec.weights, spec.parameters, spec.rank, spec.seed, name
        )
        info = AdapterInfo.of(result.adapter, f"composed: {spec.method} of {', '.join(s.adapter for s in spec.sources)}", pin)
        self.engine.register(result.adapter, info, hidden=hidden)
        if persist:
            await self._persist(result.adapter, info)
        return result

    async def _persist(self, adapter, info: AdapterInfo) -> None:
        """Write a just-registered adapter to the store; if that fails, take the name back."""
        try:
            await asyncio.to_thread(self.store.save, adapter, info)
        except BaseException:
            self.engine.unregister(info.name)
            raise

    async def ComposeAdapter(self, request: pb.ComposeAdapterRequest, context) -> pb.ComposeAdapterResponse:
        async def work() -> pb.ComposeAdapterResponse:
            name = check_name(request.name)
            if self.engine.has(name):
                raise AlreadyExistsError(f"adapter {name!r} already exists; unload it first or pick another name")
            result = await self._compose(name, request.recipe, request.pin, hidden=False, persist=True)
            report = [pb.ModuleReport(**asdict(m)) for m in result.report]
            return pb.ComposeAdapterResponse(adapter=self._entries_info(name), report=report)

        return await self._unary("ComposeAdapter", context, work)

    async def _target(self, request) -> str | None:
        """The adapter name a Generate/Score request runs with; inline recipes composed once."""
        which = request.WhichOneof("target")
        if which == "adapter":
            return request.adapter
        if which != "recipe":
            return None
        canonical = json.dumps(parse_recipe(recipe_dict(request.recipe)).model_dump(), sort_keys=True)
        key = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        async with self._inline_lock:
            if key in self._inline and self.engine.has(self._inline[key]):
                self._inline.move_to_end(key)
                return self._inline[key]
            name = f"inline-{key}"
            await self._compose(name, request.recipe, pin=False, hidden=True, persist=False)
            self._inline[key] = name
            while len(self._inline) > self.limits.inline_cache_size:
                _, old = self._inline.popitem(last=False)
                self.engine.unregister(old)  # requests using it keep it until they end
            return name

    # ---- generation and scoring ----------------------------------------------------------------

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        runtime = self.engine.runtime
        which = request.WhichOneof("input")
        if which == "prompt" and request.prompt.strip():
            return runtime.text_ids(request.prompt)
        if which == "messages" and request.messages.messages:
            messages = [{"role": m.role or "user", "content": m.content} for m in request.messages.messages]
            if any(m["role"] not in ("system", "user", "assistant") for m in messages):
                raise InvalidRequestError("message roles must be system, user or assistant")
            return runtime.chat_ids(messages)
        raise InvalidRequestError("the prompt is empty: set `prompt` or `messages`")

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._streaming("Generate", context, self._generate(request)):  # grpc.aio wants an async generator here
            yield message

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle: Request | None = None
        try:
            target = await self._target(request)
            handle = Request(
                prompt_ids=self._prompt_ids(request),
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p or 1.0,
                top_k=request.top_k,
                seed=request.seed,
                stop=list(request.stop),
            )
            self.engine.submit(handle, target, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
            first = True
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                if first and (event.text or event.token_ids):
                    self.observer.first_token(time.perf_counter() - start)
                    first = False
                if event.finish_reason is None:
                    yield pb.GenerateResponse(text=event.text, token_ids=event.token_ids)
                    continue
                if event.finish_reason != "cancelled":
                    usage = pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
                    yield pb.GenerateResponse(text=event.text, token_ids=event.token_ids, finish_reason=event.finish_reason, usage=usage)
                return
        finally:
            if handle is not None:
                handle.cancelled = True  # a client gone or a deadline passed: stop at the next step

    def _example_ids(self, examples, raw: bool) -> tuple[list[list[int]], list[list[int]]]:
        runtime = self.engine.runtime
        prompts, targets = [], []
        for i, ex in enumerate(examples):
            if not ex.input.strip() or not ex.target:
                raise InvalidRequestError(f"example {i} needs a non-empty input and target")
            prompts.append(runtime.text_ids(ex.input) if raw else runtime.chat_ids(ex.input))
            targets.append(runtime.text_ids(ex.target))
        return prompts, targets

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async def work() -> pb.ScoreResponse:
            if not request.examples:
                raise InvalidRequestError("Score needs at least one example")
            if len(request.examples) > self.limits.max_score_examples:
                raise LimitExceededError(f"{len(request.examples)} examples; the limit is {self.limits.max_score_examples}")
            prompts, targets = self._example_ids(request.examples, request.raw)
            target = await self._target(request)
            nll = await asyncio.wrap_future(self.engine.score(target, prompts, targets))
            counts = [len(t) for t in targets]
            return pb.ScoreResponse(
                log_likelihood=[-float(x) for x in nll], target_tokens=counts, mean_loss=float(nll.sum()) / sum(counts)
            )

        return await self._unary("Score", context, work)

    # ---- export and bake -----------------------------------------------------------------------

    async def ExportAdapter(self, request: pb.ExportAdapterRequest, context) -> pb.ExportAdapterResponse:
        async def work() -> pb.ExportAdapterResponse:
            path = confine(request.path, self.roots)
            adapter = self.engine.get(request.name)
            dtype = request.dtype or "float32"
            if dtype not in ("float32", "bfloat16", "float16"):
                raise InvalidRequestError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
            out = await asyncio.to_thread(save_adapter, adapter, path, dtype, request.overwrite)
            size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            return pb.ExportAdapterResponse(path=str(out), size_bytes=size)

        return await self._unary("ExportAdapter", context, work)

    async def BakeModel(self, request: pb.BakeModelRequest, context) -> AsyncIterator[pb.BakeModelProgress]:
        async for message in self._streaming("BakeModel", context, self._bake(request)):  # grpc.aio wants an async generator here
            yield message

    async def _bake(self, request: pb.BakeModelRequest) -> AsyncIterator[pb.BakeModelProgress]:
        path = confine(request.output_path, self.roots)
        adapter = self.engine.get(request.adapter)
        if request.dtype not in ("", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be float32, bfloat16 or float16, got {request.dtype!r}")
        stopped = False

        def work(report: Callable[[tuple[int, int]], None]):
            def tick(done: int, total: int) -> None:
                if stopped:
                    raise InvalidRequestError("bake cancelled by the client")  # unwinds; nothing is published
                report((done, total))

            base = self.engine.runtime.base_dir
            return bake(base, adapter, path, request.dtype or None, request.max_shard_bytes or "5GB", request.overwrite, tick)

        last = 0.0
        try:
            async for item in _reports_of(work):
                if isinstance(item, _Done):
                    manifest = item.result
                    total = manifest.total_bytes
                    yield pb.BakeModelProgress(bytes_done=total, bytes_total=total, manifest_json=json.dumps(asdict(manifest), default=str))
                elif time.monotonic() - last > 0.2:  # at most ~5 progress messages a second
                    last = time.monotonic()
                    yield pb.BakeModelProgress(bytes_done=item[0], bytes_total=item[1])
        finally:
            stopped = True

    # ---- LoraHub -------------------------------------------------------------------------------

    async def SearchWeights(self, request: pb.SearchWeightsRequest, context) -> AsyncIterator[pb.SearchWeightsProgress]:
        async for message in self._streaming("SearchWeights", context, self._search(request)):  # grpc.aio wants an async generator here
            yield message

    async def _search(self, request: pb.SearchWeightsRequest) -> AsyncIterator[pb.SearchWeightsProgress]:
        name = check_name(request.output_name)
        if self.engine.has(name):
            raise AlreadyExistsError(f"adapter {name!r} already exists; pick another output_name")
        budget, optimizer, parallel = request.budget or 40, request.optimizer or "NGOpt", request.parallel or 1
        if budget > self.limits.max_search_budget:
            raise InvalidRequestError(f"budget {budget} is over this server's cap of {self.limits.max_search_budget}")
        if len(request.examples) > self.limits.max_score_examples:
            raise LimitExceededError(f"{len(request.examples)} examples; the limit is {self.limits.max_score_examples}")
        check_settings(len(request.adapters), len(request.examples), budget, optimizer, parallel)
        sources = [self.engine.get(a) for a in request.adapters]  # NOT_FOUND before any work
        prompts, targets = self._example_ids(request.examples, request.raw)
        group = f"search-{hashlib.sha256(f'{name}/{time.time_ns()}'.encode()).hexdigest()[:12]}"
        self.engine.register_group(group, sources)
        stopped = False

        def nll(p, t, weights):
            return self.engine.score(group, p, t, weights).result()

        def work(report: Callable[[SearchProgress], None]):
            objective = weighted_objective(nll, prompts, targets)
            l1 = request.l1 if request.HasField("l1") else 0.05
            return search(objective, len(sources), budget, optimizer, request.seed, l1, 1.5, parallel, report, lambda: stopped)

        try:
            async for item in _reports_of(work):
                if not isinstance(item, _Done):
                    yield pb.SearchWeightsProgress(evaluations=item.evaluations, best_loss=item.best_loss, best_weights=item.best_weights)
                    continue
                result = item.result
                adapter = (await asyncio.to_thread(merge, sources, "linear", result.weights, None, None, 0, name)).adapter
                adapter.extra["lorahub"] = {"weights": result.weights, "best_loss": result.best_loss, "sources": list(request.adapters)}
                info = AdapterInfo.of(adapter, f"lorahub over {', '.join(request.adapters)}", request.pin)
                self.engine.register(adapter, info)
                await self._persist(adapter, info)
                yield pb.SearchWeightsProgress(
                    evaluations=len(result.losses), best_loss=result.best_loss, best_weights=result.weights, adapter=self._entries_info(name)
                )
        finally:
            stopped = True  # a cancelled call stops the search at its next evaluation
            self.engine.unregister(group)
