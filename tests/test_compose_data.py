"""Data-aware recipes over gRPC (regmean, fisher, learned with inline examples): the same adapter as
the library's on the same inputs, composed once per inline recipe, cancellable, bounded, and
every refusal a client meets. The server reads no example file: a path sent in the recipe is
refused, never opened."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from adapter_fusion import load_adapter
from adapter_fusion.client import Client, make_recipe
from adapter_fusion.data_merge import merge_with_data
from adapter_fusion.names import hidden_name
from adapter_fusion.coefficient_fit import merge_learned
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.server.service import ServiceLimits
from tests.conftest import write_peft_adapter

UPPER = [("alpha beta gamma", "ALPHA BETA GAMMA"), ("one two", "ONE TWO")]
DIGITS = [("seven", "7"), ("twelve", "12"), ("three", "3")]
MAX_EXAMPLES = 6
LONG = 9_999  # Adam steps, this server's cap (learned allows 10,000): about a minute here, so only a working cancel ends it in seconds


@pytest.fixture(scope="module")
def served(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("compose-data")
    paths = [
        write_peft_adapter(tiny_chat_base, root / "adapters" / "a", seed=1, b_scale=1.0),
        write_peft_adapter(tiny_chat_base, root / "adapters" / "b", seed=2, r=8, alpha=8, b_scale=1.0),
    ]
    config = ServerConfig(
        base_dir=tiny_chat_base,
        store_dir=root / "store",
        adapter_roots=[root / "adapters"],
        output_roots=[root / "out"],
        port=0,
        service_limits=ServiceLimits(max_examples=MAX_EXAMPLES, max_text_bytes=256, max_search_budget=LONG, max_data_sources=2),
    )
    running = BackgroundServer(config)
    client = Client(running.address)
    for path in paths:
        client.load_adapter(path.name, path)
    yield running, client, [load_adapter(p) for p in paths]
    client.close()
    running.stop()


def served_adapter(running: BackgroundServer, name: str):
    return running.running.engine.registry.get(name)


def assert_same_deltas(got, expected, tolerance: float) -> None:
    assert got.modules.keys() == expected.modules.keys()
    for path, delta in expected.modules.items():
        want, have = delta.dense().double(), got.modules[path].dense().double()  # (out, in)
        assert (have - want).abs().max() <= tolerance * want.abs().max(), path


# The server runs the library's own code on the same float32 inputs in the same order: only how a
# thread pool splits a reduction could differ, a few float32 ulps of the statistics, which the
# closed forms carry into ΔW at ~1e-6 relative; 1e-5 leaves an order of magnitude.
@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_regmean_and_fisher_over_grpc_equal_the_library(served, tiny_chat_base: Path, method: str) -> None:
    running, client, sources = served
    recipe = make_recipe(method, {"a": 1.0, "b": 0.5}, rank=8, source_examples={"a": UPPER, "b": DIGITS})
    response = client.compose(f"{method}-ab", recipe)
    assert response.adapter.source.startswith(f"composed: {method} of a, b") and len(response.report) > 0
    expected = merge_with_data(sources, method, [UPPER, DIGITS], tiny_chat_base, [1.0, 0.5], rank=8, name=f"{method}-ab").adapter
    assert_same_deltas(served_adapter(running, f"{method}-ab"), expected, 1e-5)


def test_learned_recipe_over_grpc_equals_the_library(served, tiny_chat_base: Path) -> None:
    running, client, sources = served
    examples = UPPER + DIGITS
    client.compose("learned-ab", make_recipe("learned", {"a": 0.5, "b": 0.5}, examples=examples, steps=5, per="module", seed=2))
    expected = merge_learned(sources, examples, tiny_chat_base, [0.5, 0.5], {"steps": 5, "per": "module"}, seed=2, name="learned-ab").adapter
    got = served_adapter(running, "learned-ab")
    assert got.extra["learned"]["per"] == "module" and len(got.extra["learned"]["losses"]) == 5
    assert_same_deltas(got, expected, 1e-5)


def test_model_stock_needs_no_examples_over_grpc(served) -> None:
    _, client, _ = served
    response = client.compose("stock", make_recipe("model_stock", {"a": 1.0, "b": 1.0}, average="cosine"))
    assert response.adapter.name == "stock" and len(response.report) > 0


def test_an_inline_data_recipe_is_composed_once_and_raw_is_part_of_it(served) -> None:
    running, client, _ = served

    def inline_adapters() -> set[str]:
        return {i.name for i, _ in running.running.engine.registry.listing(include_hidden=True) if i.name.startswith(hidden_name("inline", ""))}

    before = inline_adapters()
    recipe = make_recipe("regmean", {"a": 1.0, "b": 1.0}, source_examples={"a": UPPER, "b": DIGITS})
    first = "".join(r.text for r in client.generate(prompt="hello", recipe=recipe, max_new_tokens=4))
    again = "".join(r.text for r in client.generate(prompt="hello", recipe=recipe, max_new_tokens=4))
    assert first == again and len(inline_adapters() - before) == 1
    raw = make_recipe("regmean", {"a": 1.0, "b": 1.0}, source_examples={"a": UPPER, "b": DIGITS}, raw=True)
    client.score(UPPER, recipe=raw)
    assert len(inline_adapters() - before) == 2  # raw text tokenizes otherwise: another composition


def test_a_long_data_composition_blocks_no_one_and_a_cancel_stops_it(served) -> None:
    """While a learned composition runs (off the engine thread, holding no name or cache lock),
    an inline recipe that needs a merge is composed and served; cancelling the long one stops it
    at its next Adam step: nothing registered, and the next data composition runs at once."""
    running, client, _ = served
    long = make_recipe("learned", {"a": 0.5, "b": 0.5}, examples=UPPER, steps=LONG)
    call = client.stub.ComposeAdapter.future(pb.ComposeAdapterRequest(name="abandoned", recipe=long), timeout=120)
    deadline = time.monotonic() + 60
    while not running.running.service.compositions.data_lock.locked():  # the fit holds the data lock while it runs
        assert not call.done() and time.monotonic() < deadline, "the long composition never started fitting"
        time.sleep(0.01)
    svd = make_recipe("svd", {"a": 1.0, "b": 1.0}, rank=4)
    during = "".join(r.text for r in client.generate(prompt="hello", recipe=svd, max_new_tokens=3))
    assert not call.done() and running.running.service.compositions.data_lock.locked()  # composed and served while the fit still ran
    client.compose("svd-reference", svd)
    assert during == "".join(r.text for r in client.generate(prompt="hello", adapter="svd-reference", max_new_tokens=3))
    call.cancel()
    start = time.monotonic()
    client.compose("after", make_recipe("regmean", {"a": 1.0}, source_examples={"a": UPPER}))  # waits for the abandoned one to stop
    assert time.monotonic() - start < 5  # a composition of one tiny source: about a second, once the lock is free
    assert "abandoned" not in {a.name for a in client.list_adapters()} and not running.running.engine.registry.has("abandoned")


def test_raw_matters_only_with_examples(served) -> None:
    _, client, _ = served
    ties = make_recipe("ties", {"a": 1.0, "b": 1.0}, rank=4, density=0.5)
    first = client.compose("ties-ab", ties)
    ties.raw = True  # nothing is tokenised: the same recipe, a no-op
    assert client.compose("ties-ab", ties).adapter.source == first.adapter.source


def test_refusals(served) -> None:
    _, client, _ = served
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    smuggled = make_recipe("regmean", {"a": 1.0}, source_examples={"a": UPPER})
    smuggled.options["examples"] = "/etc/passwd"
    three_sources = make_recipe("regmean", {"a": 1.0, "b": 1.0}, source_examples={"a": UPPER[:1], "b": DIGITS[:1]})
    three_sources.sources.append(pb.Source(adapter="a", examples=three_sources.sources[0].examples))
    cases = [
        (make_recipe("regmean", {"a": 1.0, "b": 1.0}), invalid, "sources.0.examples: method 'regmean' learns from each source's examples"),
        (make_recipe("fisher", {"a": 1.0, "b": 1.0}, source_examples={"a": UPPER}), invalid, "sources.1.examples"),
        (make_recipe("regmean", {"a": 1.0}, examples=UPPER, source_examples={"a": UPPER}), invalid, "takes no shared examples (only learned does)"),
        (make_recipe("learned", {"a": 1.0}), invalid, "method 'learned' fits its coefficients on examples"),
        (make_recipe("learned", {"a": 1.0}, examples=UPPER, source_examples={"a": UPPER}), invalid, "takes one shared top-level `examples`"),
        (make_recipe("linear", {"a": 1.0}, source_examples={"a": UPPER}), invalid, "method 'linear' uses no examples"),
        (smuggled, invalid, "examples: unknown parameter"),
        (make_recipe("regmean", {"a": 1.0}, source_examples={"a": [("x", "")]}), invalid, "sources.0.examples: example 0 needs a non-empty input and target"),
        (make_recipe("regmean", {"a": 1.0}, source_examples={"a": [("x" * 300, "y")]}), exhausted, "sources.0.examples: example 0's input is 300 bytes; the limit is 256"),
        (make_recipe("regmean", {"a": 1.0, "b": 1.0}, source_examples={"a": UPPER * 2, "b": DIGITS}), exhausted, f"the limit is {MAX_EXAMPLES}"),
        (make_recipe("learned", {"a": 1.0}, examples=UPPER, steps=LONG + 1), exhausted, f"steps {LONG + 1} is over this server's cap of {LONG}"),
        (three_sources, exhausted, "regmean keeps per-module statistics of every source: 3 sources is over this server's cap of 2"),
        (make_recipe("regmean", {"ghost": 1.0}, source_examples={"ghost": UPPER}), grpc.StatusCode.NOT_FOUND, "ghost"),
    ]
    for recipe, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            client.compose("refused", recipe)
        assert info.value.code() == code and message in info.value.details(), (recipe, info.value.code(), info.value.details())
    assert "refused" not in {a.name for a in client.list_adapters()}
