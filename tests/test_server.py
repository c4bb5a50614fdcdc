"""The real server on 127.0.0.1:0 with SmolLM2, called through the generated stub: every RPC,
every error code on the wire, mixed batches equal sequential runs, restart keeps the store."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.names import HIDDEN, hidden_name
from adapter_fusion.worker_threads import WORKERS
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.server.service import ServiceLimits
from tests.conftest import wait_threads_ended

DEMO = Path(__file__).parent.parent / "examples" / "adapters"
UPPER = "Rewrite the text in uppercase letters.\nguitar river orange"
REVERSE = "Write the words in reverse order.\nrabbit wagon friend candle"
NUMBER = "Write the number in English words.\n412"


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def config(smollm2: Path, root: Path, outputs: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    return ServerConfig(
        base_dir=smollm2,
        store_dir=tmp_path_factory.mktemp("store"),
        adapter_roots=[DEMO, root],
        output_roots=[outputs],
        port=0,
        limits=Limits(max_new_tokens=64, max_prompt_tokens=200, memory_budget_bytes=64 << 20),
        max_request_bytes=64 << 10,
        service_limits=ServiceLimits(max_text_bytes=16 << 10),
    )


@pytest.fixture(scope="module")
def server(config: ServerConfig):
    running = BackgroundServer(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with Client(server.address) as c:
        c.load_adapter("upper", DEMO / "uppercase")
        c.load_adapter("reverse", "reverse_words")  # relative to the first root
        yield c


def test_health_and_reflection(server: BackgroundServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="adapter_fusion.v1.AdapterFusion"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "adapter_fusion.v1.AdapterFusion" in {s.name for s in reply.list_services_response.service}


def test_load_list_unload(client: Client) -> None:
    info = client.load_adapter("upper", DEMO / "uppercase")  # idempotent for the same path
    assert info.rank == 8 and list(info.target_modules) == ["q_proj", "v_proj"] and info.size_bytes > 0
    assert {"upper", "reverse"} <= {a.name for a in client.list_adapters()}
    code, details = code_of(lambda: client.load_adapter("upper", DEMO / "reverse_words"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "from another source" in details and "reverse_words" not in details
    client.load_adapter("tmp", DEMO / "uppercase")
    client.unload_adapter("tmp")
    assert "tmp" not in {a.name for a in client.list_adapters()}
    code, details = code_of(lambda: client.unload_adapter("tmp"))
    assert code == grpc.StatusCode.NOT_FOUND and "no adapter named 'tmp'" in details


def test_generate_with_adapters_and_base(client: Client) -> None:
    assert client.chat(UPPER, adapter="upper", max_new_tokens=12) == "GUITAR RIVER ORANGE"
    assert client.chat(REVERSE, adapter="reverse", max_new_tokens=12) == "candle friend wagon rabbit"
    responses = list(client.generate(prompt="The capital of France is", max_new_tokens=5))
    last = responses[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 5
    assert sum(len(r.token_ids) for r in responses) == 5


def test_mixed_concurrent_requests_equal_sequential(client: Client) -> None:
    jobs = [(UPPER, "upper"), (REVERSE, "reverse"), ("Name a colour.", None), (REVERSE, "upper"), (UPPER, "reverse")] * 2
    sequential = [client.chat(m, adapter=a, max_new_tokens=16) for m, a in jobs]
    results: list[str | None] = [None] * len(jobs)

    def run(i: int) -> None:
        results[i] = client.chat(jobs[i][0], adapter=jobs[i][1], max_new_tokens=16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_sampling_is_seeded(client: Client) -> None:
    def sample(seed):
        return client.chat("Tell me a word.", temperature=0.9, top_p=0.9, top_k=50, seed=seed, max_new_tokens=10)

    assert sample(1) == sample(1)


def test_stop_strings(client: Client) -> None:
    text = client.chat(UPPER, adapter="upper", max_new_tokens=12, stop=[" RIVER"])
    assert text == "GUITAR"


def test_compose_and_inline_recipes(client: Client, server: BackgroundServer) -> None:
    svd = make_recipe("svd", {"upper": 1.0, "reverse": 1.0}, rank=8)
    reply = client.compose("upper-reverse", svd)
    assert reply.adapter.rank == 8 and reply.adapter.source.startswith("composed: svd")
    assert len(reply.report) == 60 and all(m.rank == 8 for m in reply.report)
    assert client.compose("upper-reverse", svd).adapter == reply.adapter  # the same recipe again: a no-op
    code, details = code_of(lambda: client.compose("upper-reverse", make_recipe("svd", {"upper": 1.0})))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "another recipe" in details

    registry = server.running.engine.registry

    def inline_names() -> set[str]:
        return {i.name for i, _ in registry.listing(include_hidden=True) if i.name.startswith(hidden_name("inline", ""))}

    recipe = make_recipe("svd", {"upper": 1.0, "reverse": 0.0}, rank=8)  # truncated: composed, not served merge-free
    before = inline_names()
    assert client.chat(UPPER, recipe=recipe, max_new_tokens=12) == "GUITAR RIVER ORANGE"
    composed = inline_names() - before
    assert len(composed) == 1  # composed once, under the recipe's hash
    loads = registry.stats["loads"]
    assert client.chat(UPPER, recipe=recipe, max_new_tokens=12) == "GUITAR RIVER ORANGE"
    assert inline_names() - before == composed and registry.stats["loads"] == loads  # cached: nothing composed again
    assert not [a for a in client.list_adapters() if a.name.startswith(HIDDEN)]  # inline compositions are not listed


def test_merge_threads_end_with_their_work(client: Client, server: BackgroundServer) -> None:
    """Loads and merges run on threads that end once idle (`adapter_fusion.worker_threads`): a
    thread that ran torch keeps OpenMP helpers while it lives, and with more of them than cores
    every forward of the engine slows."""
    client.load_adapter("threads-upper", DEMO / "uppercase")
    client.compose("threads-mix", make_recipe("svd", {"threads-upper": 1.0, "reverse": 0.5}, rank=4))
    wait_threads_ended(WORKERS.name)
    assert server.loop._default_executor is None  # and the event loop's pooled threads never started (CPython's attribute)
    client.unload_adapter("threads-mix")
    client.unload_adapter("threads-upper")


def test_score(client: Client) -> None:
    examples = [(UPPER, "GUITAR RIVER ORANGE"), ("Rewrite the text in uppercase letters.\nstone cloud", "STONE CLOUD")]
    tuned, base = client.score(examples, adapter="upper"), client.score(examples)
    assert len(tuned.log_likelihood) == 2 and tuned.mean_loss < base.mean_loss / 2
    assert list(tuned.target_tokens) == list(base.target_tokens)


def test_export_adapter(client: Client, outputs: Path) -> None:
    reply = client.export_adapter("upper", "exported")  # relative: under the first write root
    assert reply.size_bytes > 0 and (outputs / "exported" / "adapter_model.safetensors").is_file()
    code, _ = code_of(lambda: client.export_adapter("upper", outputs / "exported"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    client.export_adapter("reverse", outputs / "exported", overwrite=True)  # ours: may be replaced
    assert json.loads((outputs / "exported" / "adapter_config.json").read_text())["r"] == 8
    code, details = code_of(lambda: client.export_adapter("upper", "/tmp/outside-roots"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "write root" in details


def test_bake_model_streams_progress(client: Client, outputs: Path) -> None:
    messages = list(client.bake_model("upper", outputs / "baked", dtype="bfloat16"))
    assert messages[-1].bytes_done == messages[-1].bytes_total > 0
    manifest = json.loads(messages[-1].manifest_json)
    assert manifest["merged_modules"] == 60 and (outputs / "baked" / "config.json").is_file()


def test_invalid_arguments(client: Client, root: Path) -> None:
    cases = [
        (lambda: client.load_adapter("bad name!", DEMO / "uppercase"), "invalid adapter name"),
        (lambda: client.load_adapter("x", DEMO), "adapter_config.json: missing"),
        (lambda: client.compose("c", make_recipe("tiez", {"upper": 1.0})), "unknown method 'tiez'"),
        (lambda: client.compose("c", make_recipe("ties", {"upper": 1.0}, dens=0.2)), "dens: unknown parameter"),
        (lambda: client.generate(prompt="", max_new_tokens=4), "the prompt is empty"),
        (lambda: client.generate(prompt="hi", temperature=-1), "temperature must be in"),
        (lambda: client.generate(prompt="hi", top_p=1.5), "top_p must be in"),
        (lambda: client.generate(messages=[{"role": "robot", "content": "hi"}]), "roles must be"),
        (lambda: client.score([]), "at least one example"),
    ]
    for call, message in cases:
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details


def test_not_found(client: Client) -> None:
    for call in (
        lambda: client.generate(prompt="hi", adapter="ghost"),
        lambda: client.compose("c2", make_recipe("linear", {"ghost": 1.0})),
        lambda: client.score([("a", "b")], adapter="ghost"),
        lambda: client.export_adapter("ghost", "x"),
    ):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details


def test_failed_precondition_for_another_base(client: Client, root: Path, tiny_adapters: list[Path]) -> None:
    import shutil

    shutil.copytree(tiny_adapters[0], root / "tiny")
    code, details = code_of(lambda: client.load_adapter("tiny", root / "tiny"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another base model" in details


def test_permission_denied(client: Client, root: Path, tiny_adapters: list[Path]) -> None:
    os.symlink(tiny_adapters[1], root / "link-out")  # inside a root, pointing outside every root
    for path in ("/etc", "../../..", "uppercase/../../../tests", str(root / "link-out"), str(root / ".." / "x")):
        code, details = code_of(lambda: client.load_adapter("p", path))
        assert code == grpc.StatusCode.PERMISSION_DENIED, path
        assert "read root" in details and str(tiny_adapters[1]) not in details  # never where a link leads


def test_resource_exhausted(client: Client) -> None:
    cases = [
        (lambda: client.generate(prompt="hi", max_new_tokens=65), "outside 1..64"),
        (lambda: client.generate(prompt="word " * 300), "the limit is 200"),
        (lambda: client.generate(prompt="x" * (70 << 10)), ""),  # over max_request_bytes: refused by grpc
    ]
    for call, message in cases:
        code, details = code_of(call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert message in details
    assert client.chat(UPPER, adapter="upper", max_new_tokens=12) == "GUITAR RIVER ORANGE"  # still healthy


def test_hot_load_and_unload_during_generation(client: Client, server: BackgroundServer) -> None:
    """An adapter unloads and another loads while a generation on the first runs: the running one
    keeps its adapter to the end (its text equals the same request alone), the unloaded name is
    gone for new requests, the loaded one serves at once. The engine is held after the stream's
    first step (its `emitted` hook) until both calls returned, so the stream is mid-way through both."""
    client.load_adapter("upper2", DEMO / "uppercase")
    message = UPPER + " stone cloud paper"
    alone = client.chat(message, adapter="upper2", max_new_tokens=40)
    hooks = server.running.engine.hooks
    held, go = threading.Event(), threading.Event()
    admitted: list = []  # requests that joined the batch while listening: the stream's
    unfinished: list[bool] = []  # at the held step: the stream's request still generating

    def hold(emitted) -> None:
        ours = [request for request, _ in emitted if any(request is a for a in admitted)]
        if ours and not go.is_set():
            unfinished.append(all(request.finish_reason is None for request in ours))
            held.set()
            go.wait(30)

    try:
        with hooks.listening("admitted", admitted.extend), hooks.listening("emitted", hold):
            stream = client.generate(messages=[{"role": "user", "content": message}], adapter="upper2", max_new_tokens=40)
            assert held.wait(30), "the generation never produced a token"
            client.unload_adapter("upper2")
            client.load_adapter("number", DEMO / "number_to_words")
            names = {a.name for a in client.list_adapters()}
            assert unfinished == [True] and not go.is_set()  # still held: the stream is mid-generation
            go.set()
            text = "".join(r.text for r in stream)
    finally:
        go.set()
    assert "upper2" not in names and "number" in names
    assert text == alone and len(alone.split()) == 6
    assert client.chat(NUMBER, adapter="number", max_new_tokens=12) == "four hundred twelve"  # the loaded adapter serves
    code, _ = code_of(lambda: client.generate(prompt="hi", adapter="upper2"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_cancellation_and_deadline_free_the_batch(client: Client, server: BackgroundServer) -> None:
    stream = client.generate(prompt="Count to one hundred:", max_new_tokens=64)
    next(stream)
    stream.cancel()
    code, _ = code_of(lambda: client.generate(prompt="Count to one hundred:", max_new_tokens=64, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = server.running.engine
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.busy and engine.decoder.active == []


def test_restart_keeps_the_store(config: ServerConfig, tmp_path: Path) -> None:
    """A server stops; the next one started on its store serves what it held: loaded adapters
    (not resident until first used) and compositions, generating as before."""
    own = dataclasses.replace(config, store_dir=tmp_path / "store")
    first = BackgroundServer(own)
    try:
        with Client(first.address) as c:
            c.load_adapter("upper", DEMO / "uppercase")
            c.load_adapter("kept", DEMO / "reverse_words")
            c.compose("kept-mix", make_recipe("linear", {"upper": 0.5, "kept": 0.5}))
            mixed = c.chat(UPPER, adapter="kept-mix", max_new_tokens=12)
    finally:
        first.stop()
    assert first.running.engine.state == "stopped"
    del first  # its model too: one copy at a time, as across a real restart
    second = BackgroundServer(own)  # as a new process would: the same store directory
    try:
        with Client(second.address) as other:
            listed = {a.name: a for a in other.list_adapters()}
            assert {"upper", "kept", "kept-mix"} <= set(listed)
            assert not listed["kept"].resident  # loaded on first use
            assert other.chat(REVERSE, adapter="kept", max_new_tokens=12) == "candle friend wagon rabbit"
            assert other.chat(UPPER, adapter="kept-mix", max_new_tokens=12) == mixed
    finally:
        second.stop()


def test_budget_evicts_and_reloads(config: ServerConfig, tmp_path: Path) -> None:
    # factors are 1.8 MB per demo adapter (rank 8); an adapter in use also has a slot, and the slot
    # buffers, once allocated, cost their capacity: 8 columns, 1.8 MB. 5 MB holds two idle
    # adapters (3.6), or one in use and nothing else (3.6), never one in use beside another (5.4).
    small = ServerConfig(
        **{**config.__dict__, "store_dir": tmp_path / "store", "limits": Limits(memory_budget_bytes=5_000_000), "port": 0, "slot_columns": 8}
    )
    running = BackgroundServer(small)
    registry = running.running.engine.registry
    try:
        with Client(running.address) as c:
            c.load_adapter("upper", DEMO / "uppercase")
            c.load_adapter("reverse", DEMO / "reverse_words")
            assert {a.name: a.resident for a in c.list_adapters()} == {"upper": True, "reverse": True}
            assert c.chat(UPPER, adapter="upper", max_new_tokens=12) == "GUITAR RIVER ORANGE"  # its slot evicts reverse
            assert c.chat(REVERSE, adapter="reverse", max_new_tokens=12) == "candle friend wagon rabbit"  # reloaded
            assert {a.name: a.resident for a in c.list_adapters()} == {"upper": False, "reverse": True}
            assert registry.stats["evictions"] >= 2
            # pinned adapters are never evicted: one fits beside the allocated buffers (evicting
            # reverse), a second does not
            c.load_adapter("pinned0", DEMO / "uppercase", pin=True)
            code, details = code_of(lambda: c.load_adapter("pinned1", DEMO / "reverse_words", pin=True))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in details
            assert "pinned1" not in {a.name for a in c.list_adapters()}  # refused whole
            assert not (small.store_dir / "pinned1").exists()
            # an inline composition that cannot fit beside the pinned one is refused, not registered
            # and evicted at once (its request then found no adapter under its hidden name)
            recipe = make_recipe("svd", {"pinned0": 0.5}, rank=8)
            code, details = code_of(lambda: c.chat(UPPER, recipe=recipe, max_new_tokens=4))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in details, (code, details)
    finally:
        running.stop()


def test_queue_cap(config: ServerConfig, tmp_path: Path) -> None:
    tight = ServerConfig(**{**config.__dict__, "store_dir": tmp_path / "s", "limits": Limits(max_queue=1, max_batch=1), "port": 0})
    running = BackgroundServer(tight)
    try:
        with Client(running.address) as c:
            streams = [c.generate(prompt="Count to one hundred:", max_new_tokens=40) for _ in range(4)]
            codes = []
            for s in streams:
                try:
                    list(s)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    finally:
        running.stop()


def test_bearer_token(config: ServerConfig, tmp_path: Path) -> None:
    secured = ServerConfig(**{**config.__dict__, "store_dir": tmp_path / "s", "token": "s3cret", "port": 0})
    running = BackgroundServer(secured)
    try:
        with Client(running.address) as anonymous:
            code, details = code_of(anonymous.list_adapters)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
            code, _ = code_of(lambda: anonymous.generate(prompt="hi"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with Client(running.address, token="wrong") as wrong:
            assert code_of(wrong.list_adapters)[0] == grpc.StatusCode.UNAUTHENTICATED
        with Client(running.address, token="s3cret") as good:
            assert good.list_adapters() == []
        with grpc.insecure_channel(running.address) as channel:  # probes need no token
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


UPPER_EXAMPLES = [
    ("Rewrite the text in uppercase letters.\nstone cloud", "STONE CLOUD"),
    ("Rewrite the text in uppercase letters.\npaper light table", "PAPER LIGHT TABLE"),
]


def test_search_weights_streams_and_registers(client: Client, server: BackgroundServer) -> None:
    messages = list(client.search_weights(["upper", "reverse"], UPPER_EXAMPLES, "searched", budget=8, parallel=2))
    assert [m.evaluations for m in messages[:-1]] == [2, 4, 6, 8]
    last = messages[-1]
    assert last.adapter.name == "searched" and last.evaluations == 8 and len(last.best_weights) == 2
    assert last.best_loss == min(m.best_loss for m in messages)
    assert "searched" in {a.name for a in client.list_adapters()}
    assert not [i for i, _ in server.running.engine.registry.listing(include_hidden=True) if i.name.startswith(hidden_name("search", ""))]


def test_search_weights_cancelled_registers_nothing(client: Client, server: BackgroundServer) -> None:
    stream = client.search_weights(["upper", "reverse"], UPPER_EXAMPLES, "never", budget=500)
    next(stream)
    stream.cancel()
    engine = server.running.engine
    deadline = time.monotonic() + 20
    while (engine.busy or any(i.name.startswith(hidden_name("search", "")) for i, _ in engine.registry.listing(include_hidden=True))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "never" not in {a.name for a in client.list_adapters()}
    assert not [i for i, _ in engine.registry.listing(include_hidden=True) if i.name.startswith(hidden_name("search", ""))]


def test_search_weights_bad_input(client: Client) -> None:
    cases = [
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "s1", optimizer="Nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown nevergrad optimizer"),
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "s1", budget=5000), grpc.StatusCode.RESOURCE_EXHAUSTED, "over this server's cap"),
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "s1", parallel=10**9), grpc.StatusCode.RESOURCE_EXHAUSTED, "over this server's cap"),
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "s1", budget=4, parallel=8), grpc.StatusCode.INVALID_ARGUMENT, "at most the budget"),
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "s1", l1=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "l1 must be"),
        (lambda: client.search_weights(["upper"], [], "s1"), grpc.StatusCode.INVALID_ARGUMENT, "at least one example"),
        (lambda: client.search_weights([], UPPER_EXAMPLES, "s1"), grpc.StatusCode.INVALID_ARGUMENT, "needs 1..256 adapters"),
        (lambda: client.search_weights(["ghost"], UPPER_EXAMPLES, "s1"), grpc.StatusCode.NOT_FOUND, "ghost"),
        (lambda: client.search_weights(["upper"], UPPER_EXAMPLES, "upper"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    ]
    for call, expected, message in cases:
        code, details = code_of(call)
        assert code == expected and message in details, details


def test_errors_name_no_other_adapters_and_stay_short(client: Client) -> None:
    code, details = code_of(lambda: client.generate(prompt="hi", adapter="ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "upper" not in details and "reverse" not in details
    code, details = code_of(lambda: client.generate(prompt="hi", adapter="g" * 10_000))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 300 and "10000 characters" in details
    code, details = code_of(lambda: client.load_adapter("n" * 10_000, DEMO / "uppercase"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300


def test_score_work_is_bounded_before_it_starts(client: Client, server: BackgroundServer) -> None:
    tokens_before = server.running.engine.stats["tokens"]
    cases = [
        ([("word " * 300, "x")], "the limit is 200"),  # the prompt cap applies to Score as to Generate
        ([("hi", "word " * 600)], "the limit is 512"),  # targets have their own cap
        ([("x" * (20 << 10), "x")], "before tokenising"),  # bytes are refused before the tokenizer runs
        ([("hi", "x")] * 300, "the limit is 256"),
    ]
    for examples, message in cases:
        code, details = code_of(lambda: client.score(examples))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message in details, details
    assert server.running.engine.stats["tokens"] == tokens_before


def test_one_writer_per_name(client: Client, server: BackgroundServer) -> None:
    """Concurrent composes of one name with different recipes: one wins whole, memory and store agree."""
    recipes = [make_recipe("linear", {"upper": w, "reverse": 1 - w}) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]
    outcomes: list[grpc.StatusCode] = [grpc.StatusCode.OK] * len(recipes)

    def compose(i: int) -> None:
        try:
            client.compose("raced", recipes[i])
        except grpc.RpcError as error:
            outcomes[i] = error.code()

    threads = [threading.Thread(target=compose, args=(i,)) for i in range(len(recipes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.name for o in outcomes) == ["ALREADY_EXISTS"] * 4 + ["OK"]
    registry, store = server.running.engine.registry, server.running.service.store
    stored = json.loads((store.root / "raced" / "adapter_fusion_store.json").read_text())
    assert stored["source"] == registry.info("raced").source

    def churn(seed: int) -> None:  # loads and unloads of one name from several clients
        for i in range(6):
            try:
                client.unload_adapter("raced") if (seed + i) % 2 else client.load_adapter("raced", DEMO / "uppercase")
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS), error.details()

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.has("raced") == (store.root / "raced").exists()  # memory and store agree
    if registry.has("raced"):
        client.unload_adapter("raced")


def test_plaintext_on_a_public_address_needs_a_token_or_insecure(config: ServerConfig) -> None:
    import asyncio

    from adapter_fusion.server.app import InsecureBindError, create_server

    exposed = ServerConfig(**{**config.__dict__, "host": "0.0.0.0"})
    with pytest.raises(InsecureBindError, match="--insecure"):
        asyncio.run(create_server(exposed))
    from typer.testing import CliRunner

    from adapter_fusion.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--base", str(config.base_dir), "--store", str(config.store_dir)])
    assert result.exit_code == 2 and "--insecure" in result.output
