"""ComposeAdapter and inline recipes: a recipe over loaded adapters becomes an adapter.

A recipe is parsed (INVALID_ARGUMENT before any work) and keyed by a hash of what it means (the
recipe, inline examples included, and where each source came from). Inline recipes that are a
weighted sum are served with no merge (per-row weights over resident slots); others are composed
once and cached by that hash. Data-aware methods (regmean, fisher, learned) run their inline
examples through a private copy of the server's base model (on its device) in a worker thread,
off the engine thread so streams keep decoding, one such composition at a time (each holds that
copy); a cancelled call stops at the next example or Adam step. Mixed into
`server.service.AdapterFusionService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING

from adapter_fusion.errors import AlreadyExistsError, LimitExceededError, RequestCancelledError
from adapter_fusion.merge import get_method, parse_parameters
from adapter_fusion.recipe import Recipe, merge_recipe, parse_recipe
from adapter_fusion.registry import AdapterInfo, Choice
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from server.store import check_name

if TYPE_CHECKING:
    from server.service import AdapterFusionService

MERGE_FREE = {"linear", "task_arithmetic", "cat"}  # Σ wᵢ ΔWᵢ exactly: served as per-row weights over resident slots


def recipe_dict(recipe: pb.Recipe) -> dict:
    """The proto recipe as `adapter_fusion.recipe`'s keys; inline examples only where given."""

    def examples(rows) -> dict:
        return {"examples": [{"input": e.input, "target": e.target} for e in rows]} if rows else {}

    sources = [{"adapter": s.adapter, "weight": s.weight if s.HasField("weight") else 1.0, **examples(s.examples)} for s in recipe.sources]
    out = {
        "method": recipe.method,
        "sources": sources,
        "parameters": {**dict(recipe.parameters), **dict(recipe.options)},
        "seed": recipe.seed,
        "chat": not recipe.raw,
        **examples(recipe.examples),
    }
    if recipe.HasField("rank"):
        out["rank"] = recipe.rank
    return out


class ComposeRPCs:
    """`self` is the AdapterFusionService."""

    async def _canonical(self: AdapterFusionService, recipe: pb.Recipe) -> tuple[Recipe, str]:
        """The parsed recipe and a hash of what it means: the recipe, and where each source came from."""
        spec = parse_recipe(recipe_dict(recipe))  # INVALID_ARGUMENT before any work
        await asyncio.to_thread(self._check_data_limits, recipe, spec)
        origins = [self.registry.info(s.adapter).source for s in spec.sources]  # NOT_FOUND likewise
        canonical = json.dumps({"recipe": spec.model_dump(), "origins": origins}, sort_keys=True)
        return spec, hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def _check_data_limits(self: AdapterFusionService, recipe: pb.Recipe, spec: Recipe) -> None:
        """Inline examples bounded as Score's are (count, bytes, tokens); learned's steps as SearchWeights' budget."""
        rows = [*recipe.examples, *(e for s in recipe.sources for e in s.examples)]
        if len(rows) > self.limits.max_examples:
            raise LimitExceededError(f"{len(rows)} examples in the recipe; the limit is {self.limits.max_examples}")
        if rows:
            self._example_ids(rows, recipe.raw)  # each text's bytes and tokens, as Score checks them
        method = get_method(spec.method)
        steps = parse_parameters(method, spec.parameters).steps if method.data == "coefficients" else 0
        if steps > self.limits.max_search_budget:
            raise LimitExceededError(f"steps {steps} is over this server's cap of {self.limits.max_search_budget}")

    async def _compose(self: AdapterFusionService, name: str, recipe: pb.Recipe, pin: bool, hidden: bool) -> tuple[AdapterInfo, list]:
        await self._synced([s.adapter for s in recipe.sources] + ([] if hidden else [name]))
        spec, key = await self._canonical(recipe)
        described = f"composed: {spec.method} of {', '.join(s.adapter for s in spec.sources)} (recipe {key})"
        abandoned = threading.Event()

        def compose() -> tuple[AdapterInfo, list]:
            if hidden:
                return register()
            with self.catalog.writing(name):
                self.catalog.sync([name])
                return register()

        def tick(*_) -> None:
            if abandoned.is_set():
                raise RequestCancelledError("composition abandoned: the client cancelled or its deadline passed")

        def register() -> tuple[AdapterInfo, list]:
            if self.registry.has(name):  # the same canonical recipe again is a no-op; another is refused
                if self.registry.info(name).source == described:
                    return self.registry.info(name), []
                raise AlreadyExistsError(f"adapter {name!r} already exists with another recipe; unload it first or pick another name")
            sources = [self.registry.get(s.adapter) for s in spec.sources]
            runtime = self.engine.runtime
            result = merge_recipe(spec, sources, name, runtime.base_dir, str(runtime.device), on_example=tick)
            tick()  # a call abandoned during the last step registers nothing
            info = AdapterInfo.of(result.adapter, described, pin)
            self.registry.register(result.adapter, info, hidden=hidden, persisted=not hidden)
            if not hidden:
                self._persist(result.adapter, info)
            return info, result.report

        async with self._data_lock if get_method(spec.method).data else contextlib.nullcontext():
            work = asyncio.ensure_future(asyncio.to_thread(compose))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                abandoned.set()  # the thread stops at its next example or step and registers nothing
                await asyncio.wait([work])  # the data lock is held until it has
                raise

    async def ComposeAdapter(self: AdapterFusionService, request: pb.ComposeAdapterRequest, context) -> pb.ComposeAdapterResponse:
        async def work() -> pb.ComposeAdapterResponse:
            name = check_name(request.name)
            async with self.names.hold(name):
                _, report = await self._compose(name, request.recipe, request.pin, hidden=False)
                return pb.ComposeAdapterResponse(adapter=self._info(name), report=[pb.ModuleReport(**asdict(m)) for m in report])

        return await self.calls.unary("ComposeAdapter", context, work)

    async def _target(self: AdapterFusionService, request) -> Choice:
        """What a Generate/Score request runs with: an adapter, the base model, or for an inline
        recipe either a weighted mix of loaded adapters (an exact weighted sum: no merge at all)
        or an adapter composed once and cached by the recipe's canonical hash."""
        which = request.WhichOneof("target")
        if which == "adapter":
            await self._synced([request.adapter])
            return request.adapter
        if which != "recipe":
            return None
        await self._synced([s.adapter for s in request.recipe.sources])
        spec, key = await self._canonical(request.recipe)
        if spec.method in MERGE_FREE and spec.rank is None:
            return [(s.adapter, s.weight) for s in spec.sources]
        async with self._inline_lock:
            name = self._inline.get(key)
            if name is not None and self.registry.has(name):
                self._inline.move_to_end(key)
                return name
            name = f"inline-{key}"
            await self._compose(name, request.recipe, pin=False, hidden=True)
            self._inline[key] = name
            while len(self._inline) > self.limits.inline_cache_size:
                _, old = self._inline.popitem(last=False)
                if self.registry.has(old):
                    self.registry.unregister(old)  # requests using it keep it until they end
            return name
