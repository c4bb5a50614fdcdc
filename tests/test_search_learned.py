"""SearchWeights with method "learned" over the wire: the same fit as the library's, each Adam step
one engine job (a generation finishes while a long fit runs), cancellation registers nothing,
and every refusal a client meets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from adapter_fusion import load_adapter
from adapter_fusion.client import Client
from adapter_fusion.coefficient_fit import fit_coefficients
from adapter_fusion.names import hidden_name
from adapter_fusion.runtime import Runtime
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from tests.conftest import write_peft_adapter

EXAMPLES = [("stone cloud river", "RIVER"), ("paper light", "light paper"), ("one two three", "3")]
NAMES = ["g0", "g1", "g2"]


@pytest.fixture(scope="module")
def served(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("learned-grpc")
    paths = [write_peft_adapter(tiny_chat_base, root / "adapters" / name, seed=i, b_scale=1.0) for i, name in enumerate(NAMES)]
    config = ServerConfig(base_dir=tiny_chat_base, store_dir=root / "store", adapter_roots=[root / "adapters"], output_roots=[root / "out"], port=0)
    running = BackgroundServer(config)
    client = Client(running.address)
    for name, path in zip(NAMES, paths):
        client.load_adapter(name, path)
    yield running, client, paths
    client.close()
    running.stop()


def group_slots(running: BackgroundServer) -> list[str]:
    return [i.name for i, _ in running.running.engine.registry.listing(include_hidden=True) if i.name.startswith(hidden_name("search", ""))]


@pytest.mark.parametrize("per", ["source", "module"])
def test_learned_over_grpc_is_the_library_fit(served, tiny_chat_base: Path, per: str) -> None:
    running, client, paths = served
    messages = list(client.search_weights(NAMES, EXAMPLES, f"fitted-{per}", method="learned", per=per, budget=8, lr=0.05, seed=3))
    assert [m.evaluations for m in messages] == [*range(1, 9), 8] and messages[-1].adapter.name == f"fitted-{per}"
    assert messages[-1].adapter.source == "learned over g0, g1, g2"

    # the same float32 computation in the same order on the same inputs: only the summation order
    # of a batched forward could differ, a few ulps of the loss, which Adam's 8 steps of lr 0.05
    # carry into the coefficients at most ~1e-5
    reference = fit_coefficients(Runtime(tiny_chat_base), [load_adapter(p) for p in paths], EXAMPLES, {"per": per, "steps": 8, "lr": 0.05}, init=[0.0] * 3, seed=3)
    adapter = running.running.engine.registry.get(f"fitted-{per}")
    fitted = adapter.extra["learned"]
    assert fitted["per"] == per and len(fitted["losses"]) == 8
    assert abs(messages[-1].best_loss - reference.best_loss) < 1e-5 * max(1.0, reference.best_loss)
    for path, coefficients in reference.coefficients.items():
        assert max(abs(a - b) for a, b in zip(fitted["coefficients"][path], coefficients)) < 1e-5, path
    assert not group_slots(running)
    assert client.score(EXAMPLES, adapter=f"fitted-{per}").mean_loss > 0  # registered and servable


def test_a_generation_finishes_while_a_long_fit_runs(served) -> None:
    running, client, _ = served
    expected = "".join(r.text for r in client.generate(prompt="hello", max_new_tokens=4))  # the base model's greedy answer
    stream = client.search_weights(NAMES, EXAMPLES, "long", method="learned", budget=1000)  # the server's cap
    seen: list[int] = []
    ended: list[grpc.StatusCode] = []

    def read() -> None:
        try:
            for message in stream:
                seen.append(message.evaluations)
        except grpc.RpcError as error:
            ended.append(error.code())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not seen:
        assert reader.is_alive(), "the fit's stream ended before its first step"
        time.sleep(0.01)
    text = "".join(r.text for r in client.generate(prompt="hello", max_new_tokens=4))
    steps_then = seen[-1]
    stream.cancel()
    reader.join(timeout=20)
    assert ended == [grpc.StatusCode.CANCELLED]
    assert text == expected and steps_then < 1000  # served whole and right between steps, long before the fit ends
    deadline = time.monotonic() + 20
    while (running.running.engine.busy or group_slots(running)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "long" not in {a.name for a in client.list_adapters()} and not group_slots(running)


def test_learned_refusals(served) -> None:
    _, client, _ = served

    def refused(**kwargs) -> tuple[grpc.StatusCode, str]:
        arguments = {"adapters": NAMES, "examples": EXAMPLES, "output_name": "x", **kwargs}
        with pytest.raises(grpc.RpcError) as info:
            list(client.search_weights(**arguments))
        return info.value.code(), info.value.details()

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ({"method": "gradient"}, invalid, "unknown method 'gradient'; SearchWeights runs lorahub or learned"),
        ({"method": "learned", "optimizer": "CMA"}, invalid, "optimizer and parallel are settings of method 'lorahub'"),
        ({"method": "learned", "parallel": 2}, invalid, "optimizer and parallel are settings of method 'lorahub'"),
        ({"per": "module"}, invalid, "per, lr and batch_size are settings of method 'learned'"),
        ({"method": "learned", "per": "row"}, invalid, "per"),
        ({"method": "learned", "lr": 0.0}, invalid, "lr"),
        ({"method": "learned", "bound": -1.0}, invalid, "bound"),
        ({"method": "learned", "budget": 5000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "over this server's cap"),
        ({"method": "learned", "examples": []}, invalid, "at least one example"),
        ({"method": "learned", "adapters": []}, invalid, "learned needs 1..256 adapters, got 0"),
        ({"method": "learned", "adapters": ["ghost"]}, grpc.StatusCode.NOT_FOUND, "ghost"),
        ({"method": "learned", "output_name": "g0"}, grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        ({"method": "learned", "output_name": "../x"}, invalid, "name"),
    ]
    for kwargs, code, message in cases:
        got, details = refused(**kwargs)
        assert got == code and message in details, (kwargs, got, details)
