"""Inline compositions under the registry's residency policy, over gRPC on a tiny model: the count
cap drops the least recently used one (composed again when asked for), a held one is dropped
neither by the cap nor by the memory budget while its stream runs, and none is ever listed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapter_fusion import load_adapter, merge
from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.names import HIDDEN, hidden_name
from adapter_fusion.runtime import Runtime
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.server.service import ServiceLimits
from tests.conftest import write_peft_adapter

PROMPT = "hello there"
TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inline-residency") / "adapters"
    return {
        "a": write_peft_adapter(tiny_chat_base, root / "a", seed=1),
        "b": write_peft_adapter(tiny_chat_base, root / "b", seed=2, r=8, alpha=16),
        "big": write_peft_adapter(tiny_chat_base, root / "big", seed=3, r=32, alpha=64),  # 4x b's factors
    }


@contextmanager
def serving(tiny_chat_base: Path, adapters: dict[str, Path], tmp_path: Path, inline_cache_size: int, budget: int) -> Iterator[tuple[BackgroundServer, Client]]:
    config = ServerConfig(
        base_dir=tiny_chat_base,
        store_dir=tmp_path / "store",
        adapter_roots=[adapters["a"].parent],
        output_roots=[tmp_path / "out"],
        port=0,
        limits=Limits(max_new_tokens=32, memory_budget_bytes=budget),
        service_limits=ServiceLimits(inline_cache_size=inline_cache_size),
    )
    running = BackgroundServer(config)
    try:
        with Client(running.address) as client:
            client.load_adapter("a", adapters["a"])
            client.load_adapter("b", adapters["b"])
            yield running, client
    finally:
        running.stop()


def svd(weight: float) -> pb.Recipe:
    """An inline recipe that needs a merge (truncated): one inline composition per weight."""
    return make_recipe("svd", {"a": 1.0, "b": weight}, rank=4)


def inline_name(running: BackgroundServer, recipe: pb.Recipe) -> str:
    """The registry name the server gives this recipe's inline composition (its canonical hash)."""
    _, key = asyncio.run_coroutine_threadsafe(running.running.service.compositions.parsed(recipe), running.loop).result(30)
    return hidden_name("inline", key)


def tokens(stream) -> list[int]:
    return [t for response in stream for t in response.token_ids]


def generate(client: Client, recipe: pb.Recipe) -> list[int]:
    return tokens(client.generate(prompt=PROMPT, recipe=recipe, max_new_tokens=TOKENS))


def inline_names(running: BackgroundServer) -> set[str]:
    return {i.name for i, _ in running.running.engine.registry.listing(include_hidden=True) if i.name.startswith(hidden_name("inline", ""))}


def test_the_cap_drops_the_least_recently_used_and_a_dropped_one_is_composed_again(
    tiny_chat_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    with serving(tiny_chat_base, adapters, tmp_path, inline_cache_size=2, budget=256 << 20) as (running, client):
        registry = running.running.engine.registry
        first, second, third = (inline_name(running, svd(w)) for w in (0.25, 0.5, 0.75))
        out = {w: generate(client, svd(w)) for w in (0.25, 0.5)}
        assert inline_names(running) == {first, second}
        loads = registry.stats["loads"]
        assert generate(client, svd(0.25)) == out[0.25] and registry.stats["loads"] == loads  # cached, and now the most recent
        out[0.75] = generate(client, svd(0.75))
        assert inline_names(running) == {first, third}  # over the cap: the least recently used one went
        assert registry.stats["loads"] == loads + 1
        assert generate(client, svd(0.5)) == out[0.5]  # composed again, the same adapter
        assert registry.stats["loads"] == loads + 2 and inline_names(running) == {third, second}
        merges = running.running.service.compositions.merges
        with ThreadPoolExecutor(4) as pool:  # the same new recipe four times at once: composed once
            same = list(pool.map(lambda _: generate(client, svd(1.0)), range(4)))
        assert same == [same[0]] * 4 and running.running.service.compositions.merges == merges + 1
        # never listed to a client, though the registry holds them
        assert not [a.name for a in client.list_adapters() if a.name.startswith(HIDDEN)]
        assert {a.name for a in client.list_adapters()} == {"a", "b"}


def test_a_held_inline_composition_outlives_the_cap_and_the_budget_while_its_stream_runs(
    tiny_chat_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """One inline composition kept (cap 1) and a memory budget that fits the held ones, their slot
    buffers and `big` only once the idle sources go. The engine is held at the first token of a
    stream on composition A while a request composes B (over the cap) and `big` is loaded (over
    the budget): A stays registered and resident, the idle sources are evicted instead, and both
    streams end with the tokens they have alone."""
    a, b, big = (load_adapter(adapters[n]) for n in ("a", "b", "big"))
    composed = merge([a, b], "svd", [1.0, 0.25], rank=4).adapter.size_bytes  # as large as each inline composition
    slot_buffers = Runtime(tiny_chat_base).slot_bytes([[a]])  # every slot in the preallocated columns: one cost for all
    held = 2 * composed + big.size_bytes + slot_buffers
    budget = held + a.size_bytes // 2  # over it with a and b resident: one of them must go
    assert held + a.size_bytes + b.size_bytes > budget
    with serving(tiny_chat_base, adapters, tmp_path, inline_cache_size=1, budget=budget) as (running, client):
        registry, hooks = running.running.engine.registry, running.running.engine.hooks
        first, second = inline_name(running, svd(0.25)), inline_name(running, svd(0.5))
        alone = generate(client, svd(0.25))  # composed, kept, released
        held_at, go = threading.Event(), threading.Event()
        admitted: list = []

        def hold(emitted) -> None:
            if not go.is_set() and any(request is ours for request, _ in emitted for ours in admitted):
                held_at.set()
                go.wait(30)

        try:
            with hooks.listening("admitted", admitted.extend), hooks.listening("emitted", hold):
                stream = client.generate(prompt=PROMPT, recipe=svd(0.25), max_new_tokens=TOKENS)
                assert held_at.wait(30), "the stream never produced a token"
                evictions = registry.stats["evictions"]
                other = client.generate(prompt=PROMPT, recipe=svd(0.5), max_new_tokens=TOKENS)  # composed now, waits for the engine
                deadline = time.monotonic() + 30
                while not registry.has(second):
                    assert time.monotonic() < deadline, "the second composition was never registered"
                    time.sleep(0.01)
                assert registry.has(first)  # two inline compositions over a cap of one: the held one stays
                client.load_adapter("big", adapters["big"])  # over the budget: evicts what no request holds
                resident = {info.name: is_resident for info, is_resident in registry.listing(include_hidden=True)}
                assert resident.get(first) and resident.get(second) and resident.get("big")
                assert not (resident["a"] and resident["b"]) and registry.stats["evictions"] > evictions
                go.set()
                assert tokens(stream) == alone  # no NOT_FOUND, and the adapter it started with
                during = tokens(other)
        finally:
            go.set()
        assert len(inline_names(running)) == 1  # once both are released, the cap holds again
        assert generate(client, svd(0.5)) == during
