"""The AdapterFusion servicer: proto <-> library. The registry RPCs, export and bake live here;
composition in `server.compose`, generation and scoring in `server.inference`, weight search in
`server.search`.

No maths here and nothing slow on the event loop: loading, merging, exporting, baking and every
store or path check run in worker threads; generation and scoring go to the engine's thread.
Writers of one adapter name (Load, Compose, Unload, Export) run one at a time. Names are checked
against the catalog (`server.catalog`) before use: free on one server, the shared store's view on
a cluster replica.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from adapter_fusion.adapters import Adapter, load_adapter, saved_bytes, write_adapter_files
from adapter_fusion.atomic import MARKER_BYTES, atomic_directory, tree_bytes
from adapter_fusion.bake import bake, planned_bytes
from adapter_fusion.encoding import Encoder
from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.errors import AdapterFormatError, InvalidRequestError, NotFoundError, quoted
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.names import not_hidden
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.limits import Limits
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from adapter_fusion.worker_threads import in_thread
from server.calls import Calls, Done, NameLocks, Observer, reports_of
from server.catalog import LocalCatalog
from server.compose import ComposeRPCs
from server.inference import InferenceRPCs
from server.search import SearchRPCs
from server.paths import PathPolicy
from server.quota import RootQuotas
from server.store import AdapterStore, check_name

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServiceLimits:
    max_examples: int = 256  # examples per Score, SearchWeights or data-aware recipe
    max_text_bytes: int = 64 << 10  # any one prompt, input or target, refused before tokenising
    inline_cache_size: int = 16  # inline compositions kept, least recently used dropped
    max_search_budget: int = 1000  # SearchWeights evaluations (lorahub) or Adam steps (learned)
    max_search_parallel: int = 64  # SearchWeights candidates per batched pass
    max_data_sources: int = 8  # regmean / fisher sources per recipe: each keeps per-module statistics (~1 GB on SmolLM2)
    max_recipe_sources: int = 64  # sources of any recipe (the same adapter may be named many times)
    max_output_rank: int = 1024  # a composed adapter's rank in any module
    max_dense_values: int = 2_000_000_000  # source ΔW values an elementwise method (ties, dare, ...) forms: ~20 SmolLM2-sized sources
    output_quota_bytes: int = 20 << 30  # what each write root may hold (exports, bakes): a SmolLM2 bake is ~540 MB
    fit_batch_tokens: int = 2048  # padded tokens per micro-batch of a learned fit (one longer example runs alone)
    max_fit_memory_mb: int = 4096  # a data-aware fit's estimated peak (model copy, activations, statistics), MB
    max_fit_work_tokens: int = 1_000_000  # example tokens a fit runs: × steps (learned), over every source (regmean, fisher)

    def fit_bounds(self) -> FitBounds:
        """What a data-aware composition may cost, as the library checks it before any work."""
        return FitBounds(self.fit_batch_tokens, self.max_fit_memory_mb << 20, self.max_fit_work_tokens)


@dataclass(frozen=True)
class ServedModel:
    """What the service knows of the base model, whatever engine runs it: where it is (composes and
    bakes read it), the device fits run on, its tokenizer, and what one request may ask of it."""

    base_dir: Path
    device: str
    encoder: Encoder
    limits: Limits


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


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype[:40]!r}")
    return dtype


class AdapterFusionService(ComposeRPCs, InferenceRPCs, SearchRPCs, pb_grpc.AdapterFusionServicer):
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
        self.engine = engine
        self.registry = registry
        self.model = model
        self.store = store
        self.catalog = catalog or LocalCatalog(store, registry)
        self.paths = paths
        self.limits = limits
        self.outputs = RootQuotas(paths.write_roots, limits.output_quota_bytes)
        self.calls = Calls(observer)
        self.names = NameLocks()
        self._inline: OrderedDict[str, str] = OrderedDict()  # canonical recipe hash -> hidden adapter name
        self._inline_lock = asyncio.Lock()
        self._data_lock = asyncio.Lock()  # one data-aware composition at a time: each holds a copy of the base model

    def _info(self, name: str) -> pb.AdapterInfo:
        for info, resident in self.registry.listing(include_hidden=True):
            if info.name == name:
                return info_message(info, resident)
        raise NotFoundError(f"adapter {name!r} was unloaded while this call ran")

    def _persist(self, adapter: Adapter, info: AdapterInfo) -> None:
        """Write a just-registered adapter to the store (durably); if that fails, take the name back."""
        try:
            self.catalog.persist(adapter, info)
        except BaseException:
            self.registry.unregister(info.name)
            raise

    async def _synced(self, names: list[str]) -> None:
        """Bring these names up to date with the catalog (reads the shared store on a cluster)."""
        if self.catalog.shared:
            await in_thread(self.catalog.sync, names)

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
                    self._persist(adapter, info)

        async def work() -> pb.AdapterInfo:
            name = check_name(request.name)
            async with self.names.hold(name):
                await in_thread(load, name)
                return self._info(name)

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
