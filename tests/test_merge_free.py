"""Composition with no merge: a recipe that is an exact weighted sum (linear, task_arithmetic,
cat, no truncation) is served as per-row weights over the sources' resident slots. Each row
must equal the merged `linear` adapter served alone, with nothing composed or registered."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from adapter_fusion import load_adapter, lora_layers
from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.merge import merge
from adapter_fusion.runtime import Runtime
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from adapter_fusion.decoding import greedy
from tests.numerics import EPS32, logits_bound

DEMO = Path(__file__).parent.parent / "examples" / "adapters"
NAMES = ["uppercase", "reverse_words", "count_words"]
WEIGHTINGS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0), (1, -0.5, 0.3), (0.3, 0.3, 0.3), (2, 0, -1), (0.7, 0.2, 0.1)]
PROMPTS = [
    "Rewrite the text in uppercase letters.\nguitar river orange",
    "Write the words in reverse order.\nrabbit wagon friend candle",
    "How many words are in this text?\nstone cloud paper light",
    "Rewrite the text in uppercase letters.\npaper light table",
]


@pytest.mark.parametrize("grouped_slots", [4, 0], ids=["slot-by-slot", "dense"])
def test_eight_weightings_in_one_batch_equal_each_merged_adapter(smollm2: Path, grouped_slots: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_layers, "GROUPED_SLOTS", grouped_slots)
    sources = [load_adapter(DEMO / n) for n in NAMES]
    merged = [merge(sources, "linear", list(w)).adapter for w in WEIGHTINGS]
    runtime = Runtime(smollm2)
    runtime.set_slots([[a] for a in sources] + [[m] for m in merged])  # sources in slots 1-3, merged in 4-11
    prompts = [runtime.chat_ids(PROMPTS[i % len(PROMPTS)]) for i in range(len(WEIGHTINGS))]
    mixes = [tuple((slot, (float(w),)) for slot, w in zip((1, 2, 3), weights)) for weights in WEIGHTINGS]
    mixed = greedy(runtime, prompts, mixes, 12)  # one batch, 8 different weightings
    alone = [greedy(runtime, [p], [slot], 12)[0] for p, slot in zip(prompts, range(4, 12))]
    assert mixed == alone
    assert len({tuple(t) for t in mixed}) > 2  # the weightings do differ


@pytest.fixture(scope="module")
def served(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    config = ServerConfig(
        base_dir=smollm2,
        store_dir=tmp_path_factory.mktemp("store"),
        adapter_roots=[DEMO],
        output_roots=[tmp_path_factory.mktemp("out")],
        port=0,
        limits=Limits(max_new_tokens=32, memory_budget_bytes=256 << 20),
    )
    running = BackgroundServer(config)
    with Client(running.address) as client:
        for name in NAMES:
            client.load_adapter(name, name)
        yield running, client
    running.stop()


def test_concurrent_inline_linear_recipes_are_served_without_composing(served) -> None:
    running, client = served
    registry = running.running.engine.registry
    names = [(f"merged{i}", make_recipe("linear", dict(zip(NAMES, w)))) for i, w in enumerate(WEIGHTINGS)]
    for name, recipe in names:
        client.compose(name, recipe)
    before, loads = registry.listing(include_hidden=True), registry.stats["loads"]

    def ask(i: int) -> tuple[str, str]:
        prompt, (name, recipe) = PROMPTS[i % len(PROMPTS)], names[i]
        return client.chat(prompt, recipe=recipe, max_new_tokens=12), client.chat(prompt, adapter=name, max_new_tokens=12)

    with ThreadPoolExecutor(len(names)) as pool:
        pairs = list(pool.map(ask, range(len(names))))
    assert [free for free, _ in pairs] == [composed for _, composed in pairs]
    assert registry.listing(include_hidden=True) == before and registry.stats["loads"] == loads  # nothing composed, nothing registered


def test_score_with_an_inline_mix_equals_the_composed_adapter(served, smollm2: Path) -> None:
    _, client = served
    examples = [(PROMPTS[0], "GUITAR RIVER ORANGE"), (PROMPTS[1], "candle friend wagon rabbit")]
    weights = {"uppercase": 0.8, "reverse_words": 0.6, "count_words": -0.2}
    client.compose("scored", make_recipe("task_arithmetic", weights))
    free = client.score(examples, recipe=make_recipe("task_arithmetic", weights))
    composed = client.score(examples, adapter="scored")
    # the merged factors are the sources' (scaled, re-factored exactly: a few eps32 each), so the two
    # forwards differ by float32 rounding through the depth (`numerics.logits_bound`); the loss is as
    # smooth in the logits as the logits are in the weights
    rtol = logits_bound(AutoConfig.from_pretrained(smollm2), 2 * EPS32)
    torch.testing.assert_close(torch.tensor(list(free.log_likelihood)), torch.tensor(list(composed.log_likelihood)), rtol=rtol, atol=0)


def test_a_mix_naming_a_missing_adapter_is_not_found(served) -> None:
    import grpc

    _, client = served
    with pytest.raises(grpc.RpcError) as error:
        client.chat(PROMPTS[0], recipe=make_recipe("linear", {"uppercase": 1.0, "nowhere": 1.0}), max_new_tokens=4)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "nowhere" in error.value.details()
