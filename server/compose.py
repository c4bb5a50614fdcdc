"""ComposeAdapter and inline recipes: a recipe over loaded adapters becomes an adapter.

A recipe is parsed (INVALID_ARGUMENT before any work) and keyed by a hash of what it means (the
recipe, inline examples included, and where each source came from). Inline recipes that are a
weighted sum are served with no merge (per-row weights over resident slots); others are composed
once per hash (concurrent requests for it wait for that one) and cached. Data-aware methods
(regmean, fisher, learned) run their inline examples through a private copy of the server's base
model (on its device) in a worker thread, off the engine thread so streams keep decoding, one
such composition at a time (each holds that copy); a cancelled call stops at the next example or
Adam step and registers nothing. Name locks are held only to check and to register, never while
composing. Inline compositions are kept by the registry (its residency policy drops the least
recently used over `inline_cache_size`, never a held one) and handed to the engine held: nothing
can drop one between composing it and serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from adapter_fusion.adapters import Adapter
from adapter_fusion.errors import AlreadyExistsError, LimitExceededError, RequestCancelledError
from adapter_fusion.merge import MergeResult, get_method, parse_parameters
from adapter_fusion.merge.cost import merge_cost
from adapter_fusion.recipe import Recipe, parse_recipe
from adapter_fusion.recipe_run import merge_recipe
from adapter_fusion.entries import AdapterInfo, Hold
from adapter_fusion.names import hidden_name, not_hidden
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.calls import NameLocks
from adapter_fusion.server.inputs import Inputs
from adapter_fusion.server.served import ServedModel, ServiceLimits
from adapter_fusion.server.writes import AdapterWrites

WORD = re.compile(r"[^ ]+")
T = TypeVar("T")
MERGE_FREE = {"linear", "task_arithmetic", "cat"}  # Σ wᵢ ΔWᵢ exactly: served as per-row weights over resident slots


def recipe_dict(recipe: pb.Recipe) -> dict:
    """The proto recipe as `adapter_fusion.recipe`'s keys; examples (and how to read them) only where given."""

    def examples(rows) -> dict:
        return {"examples": [{"input": e.input, "target": e.target} for e in rows]} if rows else {}

    sources = [{"adapter": s.adapter, "weight": s.weight if s.HasField("weight") else 1.0, **examples(s.examples)} for s in recipe.sources]
    out = {"method": recipe.method, "sources": sources, "parameters": {**dict(recipe.parameters), **dict(recipe.options)}, "seed": recipe.seed}
    out |= examples(recipe.examples)
    if recipe.examples or any(s.examples for s in recipe.sources):
        out["chat"] = not recipe.raw
    if recipe.HasField("rank"):
        out["rank"] = recipe.rank
    return out


def example_sets(recipe: pb.Recipe) -> list[tuple[str, list]]:
    """(where, examples) of each set the recipe carries."""
    sets = [("examples", list(recipe.examples))] if recipe.examples else []
    return sets + [(f"sources.{i}.examples", list(s.examples)) for i, s in enumerate(recipe.sources) if s.examples]


def _words(text: str) -> int:
    """Runs of characters between ASCII spaces (other whitespace may sit inside a token)."""
    return sum(1 for _ in WORD.finditer(text))


async def finished(task: asyncio.Future) -> None:
    """Wait until `task` is done, through further cancellations, and collect its outcome."""
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            continue
    if not task.cancelled():
        task.exception()  # collected: asyncio logs no "exception was never retrieved"


class Compositions:
    """Recipes into adapters: parse -> key -> merge-free mix or compose -> cache, each bounded first."""

    def __init__(self, *, writes: AdapterWrites, names: NameLocks, inputs: Inputs, model: ServedModel, limits: ServiceLimits) -> None:
        self.writes, self.registry, self.catalog, self.store = writes, writes.registry, writes.catalog, writes.store
        self.names, self.inputs, self.model, self.limits = names, inputs, model, limits
        self.registry.cap_inline(limits.inline_cache_size)
        self.data_lock = asyncio.Lock()  # one data-aware composition at a time: each holds a copy of the base model
        self.merges = 0  # merges started: a cached inline recipe, or one another request is composing, starts none
        self._merges_lock = threading.Lock()

    async def parsed(self, recipe: pb.Recipe, also: list[str] = ()) -> tuple[Recipe, str]:
        """The parsed recipe and a hash of what it means: the recipe, and where each source came
        from. INVALID_ARGUMENT, RESOURCE_EXHAUSTED and NOT_FOUND before any work."""
        if len(recipe.sources) > self.limits.max_recipe_sources:
            raise LimitExceededError(f"the recipe has {len(recipe.sources)} sources; this server's cap is {self.limits.max_recipe_sources}")
        await self.writes.synced([not_hidden(s.adapter) for s in recipe.sources] + list(also))
        spec = parse_recipe(recipe_dict(recipe))
        self._check_data_bounds(recipe, spec)
        origins = [self.registry.info(s.adapter).source for s in spec.sources]
        canonical = json.dumps({"recipe": spec.model_dump(), "origins": origins}, sort_keys=True)
        return spec, hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def _check_data_bounds(self, recipe: pb.Recipe, spec: Recipe) -> None:
        """What a data-aware recipe may cost: examples as many as a Score's, learned's steps as
        SearchWeights' budget, its sources as SearchWeights' (side by side in one slot), regmean's
        and fisher's sources few (each keeps per-module statistics)."""
        method = get_method(spec.method)
        if method.data is None:
            return
        count = sum(len(rows) for _, rows in example_sets(recipe))
        if count > self.limits.max_examples:
            raise LimitExceededError(f"{count} examples in the recipe; the limit is {self.limits.max_examples}")
        passes = 1
        if method.data == "coefficients":
            passes = self.limits.check_learned(len(spec.sources), parse_parameters(method, spec.parameters).steps, "steps")
        elif len(spec.sources) > self.limits.max_data_sources:
            raise LimitExceededError(
                f"{spec.method} keeps per-module statistics of every source: {len(spec.sources)} sources is over this server's cap of "
                f"{self.limits.max_data_sources}"
            )
        # Before any tokenising (seconds of CPU for a large request): no token of a byte-level BPE or
        # whitespace-splitting SentencePiece vocabulary spans an ASCII space, so the space-separated
        # words x passes is a floor of the fit's work; the exact count is checked against the same
        # cap once tokenised (`fit_cost`).
        words = sum(_words(e.input) + _words(e.target) for _, rows in example_sets(recipe) for e in rows)
        if words * passes > self.limits.max_fit_work_tokens:
            raise LimitExceededError(
                f"the {spec.method} fit would run at least {words * passes:,} example tokens through the model ({words:,} words x "
                f"{passes} passes); this server's cap is {self.limits.max_fit_work_tokens:,}"
            )

    def _check_cost(self, spec: Recipe, sources: list[Adapter], stored: bool) -> None:
        """Refuse a merge whose output or work is over this server's caps, from the sources' shapes
        before any arithmetic: its bytes (it must fit the memory budget to be served, and the store's
        quota if it is stored), its rank, and an elementwise method's dense work."""
        cost = merge_cost(sources, get_method(spec.method), spec.rank)
        if stored:
            self.store.quota.check(cost.output_bytes, f"the {spec.method} output")
        budget = self.registry.policy.limit_bytes
        if cost.output_bytes > budget:
            raise LimitExceededError(
                f"the {spec.method} output would take {cost.output_bytes / 1e6:.1f} MB, over the memory budget of {budget / 1e6:.1f} MB"
            )
        if cost.max_rank > self.limits.max_output_rank:
            raise LimitExceededError(f"the {spec.method} output would have rank {cost.max_rank}; this server's cap is {self.limits.max_output_rank}")
        if cost.dense_values > self.limits.max_dense_values:
            raise LimitExceededError(
                f"{spec.method} would form {cost.dense_values:,} dense delta values ({len(sources)} sources); this server's cap is "
                f"{self.limits.max_dense_values:,}: use fewer sources, fewer target modules, or a low-rank method (linear, svd)"
            )

    async def compose(self, name: str, recipe: pb.Recipe, spec: Recipe, key: str, pin: bool) -> tuple[AdapterInfo, list]:
        """ComposeAdapter: the recipe composed, registered under `name` and stored; (its info, the
        per-module report). The same recipe under the name already is a no-op."""
        described = _described(spec, key)

        def existing() -> AdapterInfo | None:
            """The same recipe under this name already: a no-op; another: refused."""
            if not self.registry.has(name):
                return None
            if self.registry.info(name).source == described:
                return self.registry.info(name)
            raise AlreadyExistsError(f"adapter {name!r} already exists with another recipe; unload it first or pick another name")

        @contextlib.contextmanager
        def name_checked():
            """The catalog's lock on a listed name, with its view brought up to date (a cluster's store)."""
            with self.catalog.writing(name):
                self.catalog.sync([name])
                yield

        def register(merged: Callable[[], MergeResult]) -> tuple[AdapterInfo, list]:
            with name_checked():
                found = existing()
            if found is not None:
                return found, []
            result = merged()
            info = AdapterInfo.of(result.adapter, described, pin)
            with name_checked():
                found = existing()  # another writer may have been first
                if found is not None:
                    return found, []
                self.registry.register(result.adapter, info)
                self.writes.persist(result.adapter, info)
            return info, result.report

        return await self._composed(name, recipe, spec, stored=True, register=register, abandon=lambda _: None)

    async def _inline(self, name: str, recipe: pb.Recipe, spec: Recipe, key: str) -> Hold:
        """An inline recipe composed and registered as the inline composition `name`, held."""
        described = _described(spec, key)

        def register(merged: Callable[[], MergeResult]) -> Hold:
            result = merged()
            return self.registry.add_inline(result.adapter, AdapterInfo.of(result.adapter, described, False))

        # finished just as the call ended: kept in the registry's inline cache, not held
        return await self._composed(name, recipe, spec, stored=False, register=register, abandon=self.registry.release)

    async def _composed(
        self,
        name: str,
        recipe: pb.Recipe,
        spec: Recipe,
        stored: bool,
        register: Callable[[Callable[[], MergeResult]], T],
        abandon: Callable[[T], None],
    ) -> T:
        """`register(merged)` in a worker thread, where `merged()` runs the merge (bounded first);
        a cancelled call stops the merge at its next example or Adam step, and `abandon`s what
        `register` returned if it finished just as the call ended."""
        abandoned = threading.Event()

        def tick(*_) -> None:
            if abandoned.is_set():
                raise RequestCancelledError("composition abandoned: the client cancelled or its deadline passed")

        def merged() -> MergeResult:
            sources = [self.registry.get(s.adapter) for s in spec.sources]
            self._check_cost(spec, sources, stored)  # from shapes: before the tokenising below
            for where, rows in example_sets(recipe):
                self.inputs.example_ids(rows, recipe.raw, where)  # every text and token limit, as Score checks them
            with self._merges_lock:
                self.merges += 1
            result = merge_recipe(spec, sources, name, self.model.base_dir, self.model.device, on_example=tick, bounds=self.limits.fit_bounds())
            tick()  # a call abandoned during the last step registers nothing
            return result

        async with self.data_lock if get_method(spec.method).data else contextlib.nullcontext():
            work = asyncio.ensure_future(in_thread(register, merged))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                abandoned.set()  # the thread stops at its next example or step and registers nothing
                await finished(work)  # the data lock is held until it has
                if not work.cancelled() and work.exception() is None:
                    abandon(work.result())
                raise

    async def target(self, request) -> Hold:
        """What a Generate/Score request runs with, held for it (the engine releases it when the
        request ends): an adapter, the base model, or for an inline recipe either a weighted mix of
        loaded adapters (an exact weighted sum: no merge at all) or the registry's inline
        composition for the recipe's canonical hash, composed once if it has none; held from the
        moment it is registered, so no budget check or cap drops it before the request runs."""
        which = request.WhichOneof("target")
        if which == "adapter":
            await self.writes.synced([not_hidden(request.adapter)])
            return self.registry.hold(request.adapter)
        if which != "recipe":
            return self.registry.hold(None)
        spec, key = await self.parsed(request.recipe)
        if spec.method in MERGE_FREE and spec.rank is None:
            return self.registry.hold([(s.adapter, s.weight) for s in spec.sources])
        name = hidden_name("inline", key)
        hold = self.registry.hold_inline(name)
        if hold is None:
            async with self.names.hold(name):  # one composition per recipe: the same recipe meanwhile waits, then holds it
                hold = self.registry.hold_inline(name)
                if hold is None:
                    hold = await self._inline(name, request.recipe, spec, key)
        return hold


def _described(spec: Recipe, key: str) -> str:
    """The source a composition is registered with: what it is, and its recipe's hash."""
    return f"composed: {spec.method} of {', '.join(s.adapter for s in spec.sources)} (recipe {key})"
