"""What one ComposeAdapter or inline recipe can spend or take from others, over the wire: the
names inline compositions live under, the size and work of a merge (refused from the sources'
shapes before any arithmetic), and pins that the memory budget could never serve."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.names import hidden_name
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import ServerConfig
from adapter_fusion.server.served import ServiceLimits

from .conftest import RPC_TIMEOUT, code_of, greedy, load, serving

PROMPT = "Write a short story about rivers and stones."


def _config(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], **settings) -> ServerConfig:
    for path in tok_adapters[:2]:
        shutil.copytree(path, tmp_path / "adapters" / path.name)
    return ServerConfig(
        base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[tmp_path / "adapters"], output_roots=[tmp_path / "out"], port=0, **settings
    )


def _copies(method: str, name: str, n: int) -> pb.Recipe:
    """A recipe naming one adapter `n` times: the amplification a 56 KB request could ask for."""
    return pb.Recipe(method=method, sources=[pb.Source(adapter=name, weight=1.0 / n) for _ in range(n)])


def _stored(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "store").iterdir()}


def _inline(client: Client, recipe: pb.Recipe) -> tuple[int, ...]:
    ids: list[int] = []
    for reply in client.generate(prompt=PROMPT, recipe=recipe, max_new_tokens=6, timeout=RPC_TIMEOUT):
        ids.extend(reply.token_ids)
    return tuple(ids)


def test_no_client_can_take_or_address_an_inline_compositions_name(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """The name an inline recipe is composed under is the server's: a client who knows the
    recipe (and so its hash) composes first under every name it could derive, and the victim's
    recipe still gives what the same recipe composed by name gives."""
    victim = make_recipe("svd", {"alpha": 0.7, "beta": 0.3}, rank=2)  # not a weighted sum: composed once, cached
    with serving(_config(tmp_path, tok_base, tok_adapters)) as server, Client(server.address) as client:
        for path in tok_adapters[:2]:
            load(client, path.name, path.name)
        service = server.running.service
        _, key = asyncio.run_coroutine_threadsafe(service.compositions.parsed(victim), server.loop).result(timeout=RPC_TIMEOUT)
        squatter = make_recipe("linear", {"alpha": 1.0})
        client.compose(f"inline-{key}", squatter)  # the name inline compositions had: now an ordinary client name
        code, details = code_of(lambda: client.compose(hidden_name("inline", key), squatter))  # the server's own
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid adapter name" in details, details
        client.compose("reference", victim)
        assert _inline(client, victim) == greedy(client, "reference")
        # nor can a client use what the server holds under its own names: as a target, a recipe's source, a search's or a bake's
        hidden = hidden_name("inline", key)
        attempts = [
            lambda: greedy(client, hidden),
            lambda: _inline(client, make_recipe("linear", {hidden: 1.0})),
            lambda: list(client.search_weights([hidden, "alpha"], [("a", "b")], "searched", budget=2)),
            lambda: list(client.bake_model(hidden, "baked")),
        ]
        for attempt in attempts:
            code, details = code_of(attempt)
            assert code == grpc.StatusCode.NOT_FOUND and "no adapter named" in details, (code, details)


def test_a_merge_over_the_caps_is_refused_before_any_work(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    limits = ServiceLimits(max_recipe_sources=64, max_output_rank=16, max_dense_values=1_000_000)
    with serving(_config(tmp_path, tok_base, tok_adapters, service_limits=limits, limits=Limits(memory_budget_bytes=1 << 20))) as server:
        with Client(server.address) as client:
            load(client, "alpha", "alpha")  # rank 4 on every projection of the tiny model: ~35 KB
            before = _stored(tmp_path)
            cases = [  # (recipe, what the refusal names, whether an inline recipe composes it: not a weighted sum)
                (_copies("cat", "alpha", 4000), "4000 sources; this server's cap is 64", False),
                (_copies("cat", "alpha", 64), "over the memory budget of 1.0 MB", False),  # rank 256: 2.2 MB
                (_copies("cat", "alpha", 8), "rank 32; this server's cap is 16", False),
                (_copies("ties", "alpha", 64), "dense delta values", True),
            ]
            for recipe, named, composed_inline in cases:
                start = time.monotonic()
                code, details = code_of(lambda: client.compose("amplified", recipe))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and named in details, (code, details)
                assert time.monotonic() - start < 5  # refused from shapes, not after merging
                if composed_inline or "sources" in named:  # a weighted sum inline is a mix, not an output: only its count is bounded
                    code, details = code_of(lambda: _inline(client, recipe))
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and named in details, (code, details)
            assert _stored(tmp_path) == before  # nothing written
            # the control: a low-rank method over the same 64 copies forms no dense delta; its output has rank 4
            assert client.compose("low-rank", _copies("svd", "alpha", 64)).adapter.rank == 4


def test_every_pin_accepted_can_be_served(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """Pins are taken until the memory budget refuses one; every pin it took then generates, all
    of them held at once (a pin is never evicted)."""
    config = _config(tmp_path, tok_base, tok_adapters, limits=Limits(memory_budget_bytes=3 << 20))
    with serving(config) as server, Client(server.address) as client:
        for path in tok_adapters[:2]:
            load(client, path.name, path.name)
        pinned, refusal = [], None
        for i in range(60):
            code, details = code_of(lambda: client.compose(f"pin{i}", make_recipe("cat", {"alpha": 1.0, "beta": -0.5 + i / 100}), pin=True))
            if code != grpc.StatusCode.OK:
                refusal = (code, details)
                break
            pinned.append(f"pin{i}")
        assert refusal is not None and refusal[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in refusal[1], refusal
        assert len(pinned) >= 2
        for name in pinned:
            code, details = code_of(lambda: greedy(client, name))
            assert code == grpc.StatusCode.OK, (name, code, details)


def test_a_stored_output_over_the_store_quota_is_refused_before_merging(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """The store's quota is checked against the output's size from shapes, before the merge runs
    (the store's own check at the write would come only after the work)."""
    config = _config(tmp_path, tok_base, tok_adapters, store_quota_bytes=300_000)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")  # ~40 KB stored
        code, details = code_of(lambda: client.compose("wide", _copies("ties", "alpha", 16), pin=False))
        assert code == grpc.StatusCode.OK, details  # rank 4: fits
        code, details = code_of(lambda: client.compose("wider", _copies("cat", "alpha", 16)))  # rank 64: ~560 KB
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the cat output needs" in details and "--store-quota-mb" in details, details
        code, details = code_of(lambda: _inline(client, make_recipe("svd", {"alpha": 0.5}, rank=64)))  # inline: never stored
        assert code == grpc.StatusCode.OK, details


def test_a_fit_whose_words_alone_pass_the_work_cap_is_refused_before_tokenising(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """Every word is at least one token: a request whose words x steps pass the cap is refused from
    its text on arrival (tokenising 256 long examples took seconds of CPU from every stream)."""
    config = _config(tmp_path, tok_base, tok_adapters, service_limits=ServiceLimits(max_fit_work_tokens=5_000))
    with serving(config) as server, Client(server.address) as client:
        for path in tok_adapters[:2]:
            load(client, path.name, path.name)
        examples = [("word " * 40, "answer " * 10)] * 10  # 500 words
        recipe = make_recipe("learned", {"alpha": 0.5, "beta": 0.5}, examples=examples, steps=11)
        code, details = code_of(lambda: client.compose("fitted", recipe))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "at least 5,500 example tokens" in details and "500 words x 11 passes" in details and "cap is 5,000" in details, details
        code, details = code_of(lambda: client.compose("fitted", make_recipe("learned", {"alpha": 0.5, "beta": 0.5}, examples=examples[:1], steps=2)))
        assert code == grpc.StatusCode.OK, details  # 100 words x 2: under the floor and the exact count
