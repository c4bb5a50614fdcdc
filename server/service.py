"""The AdapterFusion servicer: proto <-> library, composed of collaborators with one job each:
request inputs and their limits (`adapter_fusion.server.inputs`), adapter writes (`adapter_fusion.server.writes`), compositions
(`adapter_fusion.server.compose`), generation and scoring (`adapter_fusion.server.inference`), weight search (`adapter_fusion.server.search`).
The registry RPCs, export and bake live here.

No maths here and nothing slow on the event loop: loading, merging, exporting, baking and every
store or path check run in worker threads; generation and scoring go to the engine's thread.
Writers of one adapter name (Load, Compose, Unload, Export) run one at a time. Names are checked
against the catalog (`adapter_fusion.server.catalog`) before use: free on one server, the shared store's view on
a cluster replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from adapter_fusion.adapter_save import saved_bytes, write_adapter_files
from adapter_fusion.adapters import load_adapter
from adapter_fusion.atomic import MARKER_BYTES, atomic_directory, tree_bytes
from adapter_fusion.bake import bake, planned_bytes
from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.errors import AdapterFormatError, InvalidRequestError, quoted
from adapter_fusion.names import not_hidden
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.calls import Calls, Done, NameLocks, Observer, reports_of
from adapter_fusion.server.catalog import LocalCatalog
from adapter_fusion.server.compose import Compositions
from adapter_fusion.server.inference import Inference
from adapter_fusion.server.inputs import Inputs
from adapter_fusion.server.search import Search
from adapter_fusion.server.paths import PathPolicy
from adapter_fusion.server.quota import RootQuotas
from adapter_fusion.server.served import ServedModel, ServiceLimits
from adapter_fusion.server.store import AdapterStore, check_name
from adapter_fusion.server.writes import AdapterWrites, info_message

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype[:40]!r}")
    return dtype


class AdapterFusionService(pb_grpc.AdapterFusionServicer):
    def __init__(
        self,
        engine: ServingEngine,
        registry: AdapterRegistry,
        model: ServedModel,
        store: AdapterStore,
        paths: PathPolicy,
        limits: ServiceLimits = ServiceLimits(),
        observer: Observer | None = None,
        catalog: LocalCatalog | None = None,
    ) -> None:
        self.engine, self.registry, self.model, self.store, self.paths, self.limits = engine, registry, model, store, paths, limits
        self.catalog = catalog or LocalCatalog(store, registry)
        self.outputs = RootQuotas(paths.write_roots, limits.output_quota_bytes)
        self.calls = Calls(observer)
        self.names = NameLocks()
        self.writes = AdapterWrites(registry, self.catalog, store)
        inputs = Inputs(model, limits)
        self.compositions = Compositions(writes=self.writes, names=self.names, inputs=inputs, model=model, limits=limits)
        self.inference = Inference(engine=engine, registry=registry, inputs=inputs, compositions=self.compositions, calls=self.calls)
        self.search = Search(engine=engine, writes=self.writes, names=self.names, inputs=inputs, model=model, limits=limits)

    # ---- composition, inference, search: their collaborators ----------------------------------

    async def ComposeAdapter(self, request: pb.ComposeAdapterRequest, context) -> pb.ComposeAdapterResponse:
        async def work() -> pb.ComposeAdapterResponse:
            name = check_name(request.name)
            async with self.names.hold(name):
                spec, key = await self.compositions.parsed(request.recipe, also=[name])
                _, report = await self.compositions.compose(name, request.recipe, spec, key, request.pin)
                return pb.ComposeAdapterResponse(adapter=self.writes.info(name), report=[pb.ModuleReport(**asdict(m)) for m in report])

        return await self.calls.unary("ComposeAdapter", context, work)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self.calls.streaming("Generate", context, self.inference.generate(request, context)):  # grpc.aio wants an async generator here
            yield message

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self.calls.unary("Score", context, lambda: self.inference.score(request, context))

    async def SearchWeights(self, request: pb.SearchWeightsRequest, context) -> AsyncIterator[pb.SearchWeightsProgress]:
        async for message in self.calls.streaming("SearchWeights", context, self.search.search(request, context)):
            yield message

    # ---- registry ------------------------------------------------------------------------------

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.AdapterInfo:
        def load(name: str) -> None:
            path = self.paths.readable(request.path)
            try:
                adapter = load_adapter(path, name)
            except AdapterFormatError as error:  # said with the client's path, not where a link led
                raise type(error)(str(error).replace(str(path), request.path)) from None
            info = AdapterInfo.of(adapter, str(path), request.pin)
            with self.catalog.writing(name):
                self.catalog.sync([name])
                known = self.registry.has(name)
                self.registry.register(adapter, info)  # no-op for the same path, ALREADY_EXISTS for another
                if not known:
                    self.writes.persist(adapter, info)

        async def work() -> pb.AdapterInfo:
            name = check_name(request.name)
            async with self.names.hold(name):
                await in_thread(load, name)
                return self.writes.info(name)

        return await self.calls.unary("LoadAdapter", context, work)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        def unload(name: str) -> None:
            with self.catalog.writing(name):
                self.catalog.sync([name])
                self.registry.info(name)  # NOT_FOUND before touching the store
                self.catalog.delete(name)

        async def work() -> pb.UnloadAdapterResponse:
            name = check_name(request.name)
            async with self.names.hold(name):
                await in_thread(unload, name)
            return pb.UnloadAdapterResponse()

        return await self.calls.unary("UnloadAdapter", context, work)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        async def work() -> pb.ListAdaptersResponse:
            if self.catalog.shared:
                await in_thread(self.catalog.sync_all)
            rows = sorted(self.registry.listing(), key=lambda row: row[0].name)
            return pb.ListAdaptersResponse(adapters=[info_message(i, r) for i, r in rows])

        return await self.calls.unary("ListAdapters", context, work)

    # ---- export and bake -----------------------------------------------------------------------

    async def ExportAdapter(self, request: pb.ExportAdapterRequest, context) -> pb.ExportAdapterResponse:
        def export(dtype: str) -> pb.ExportAdapterResponse:
            path = self.paths.writable(request.path, request.overwrite)
            with self.catalog.writing(request.name):
                self.catalog.sync([request.name])
                adapter = self.registry.get(request.name)
                with self.catalog.writing_output(path):
                    path = self.paths.writable(request.path, request.overwrite)  # again: now nobody else writes there
                    root = self.paths.write_root_of(path)
                    with self.outputs.claim(root, saved_bytes(adapter, dtype), f"exporting {quoted(request.name)}") as claim:
                        with atomic_directory(path, request.overwrite, root=root) as tmp:  # never re-resolves `path`
                            write_adapter_files(adapter, tmp, dtype)
                            claim.written = tree_bytes(tmp) + MARKER_BYTES
            return pb.ExportAdapterResponse(path=str(path), size_bytes=claim.written)

        async def work() -> pb.ExportAdapterResponse:
            dtype = _check_dtype(request.dtype or "float32")
            async with self.names.hold(check_name(request.name)):
                return await in_thread(export, dtype)

        return await self.calls.unary("ExportAdapter", context, work)

    async def BakeModel(self, request: pb.BakeModelRequest, context) -> AsyncIterator[pb.BakeModelProgress]:
        async for message in self.calls.streaming("BakeModel", context, self._bake(request)):  # grpc.aio wants an async generator here
            yield message

    async def _bake(self, request: pb.BakeModelRequest) -> AsyncIterator[pb.BakeModelProgress]:
        dtype = _check_dtype(request.dtype) if request.dtype else None
        stopped = False

        def work(report: Callable[[tuple[int, int]], None]):
            path = self.paths.writable(request.output_path, request.overwrite)
            self.catalog.sync([not_hidden(request.adapter)])
            adapter = self.registry.get(request.adapter)

            def tick(done: int, total: int) -> None:
                if stopped:
                    raise InvalidRequestError("bake cancelled by the client")  # unwinds; nothing is published
                report((done, total))

            base = self.model.base_dir
            with self.catalog.writing_output(path):
                path = self.paths.writable(request.output_path, request.overwrite)  # again: now nobody else writes there
                root = self.paths.write_root_of(path)
                with self.outputs.claim(root, planned_bytes(base, adapter, dtype), f"baking {quoted(request.adapter)}"):
                    return bake(base, adapter, path, dtype, request.max_shard_bytes or "5GB", request.overwrite, tick, root=root)

        last = 0.0
        try:
            async for item in reports_of(work):
                if isinstance(item, Done):
                    total = item.result.total_bytes
                    manifest = json.dumps(asdict(item.result), default=str)
                    yield pb.BakeModelProgress(bytes_done=total, bytes_total=total, manifest_json=manifest)
                elif time.monotonic() - last > 0.2:  # at most ~5 progress messages a second
                    last = time.monotonic()
                    yield pb.BakeModelProgress(bytes_done=item[0], bytes_total=item[1])
        finally:
            stopped = True
