"""A real local Ray cluster (2 CPUs) running `adapter-fusion cluster`'s application with 2
replicas on the reliability suite's tiny base (`tok_base`, SmolLM2's tokenizer) and its four
peft adapters (`tok_adapters`), plus a single server on the same inputs as the reference.

One deployment per module: starting Ray and two replicas costs ~20 s on 2 cores.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter_fusion.routing import LOADS_KEY, REPLICA_KEY
from adapter_fusion.client import Client
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from tests.reliability import conftest as reliability

tok_base = reliability.tok_base  # the reliability suite's tiny base and its four adapters, as fixtures here too
tok_adapters = reliability.tok_adapters
code_of = reliability.code_of

TOKEN = "cluster-test-token"
PROMPTS = ["Write a short story about rivers and stones.", "List three colours.", "Count to five.", "Say hello."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    config: object  # ClusterConfig
    roots: dict[str, Path]

    def client(self, **options) -> Client:
        return Client(self.address, token=TOKEN, **options)


def served_by(call) -> tuple[str, int]:
    """(replica id, its adapter loads so far) from a finished call's trailing metadata; ("", 0)
    from a single server, which sends none."""
    metadata = dict(call.trailing_metadata() or ())
    return metadata.get(REPLICA_KEY, ""), int(metadata.get(LOADS_KEY, 0))


def generate(client: Client, adapter: str | None, prompt: str = PROMPTS[0], tokens: int = 8, **options) -> tuple[tuple[int, ...], str]:
    """Greedy token ids and the replica that produced them."""
    stream = client.generate(prompt=prompt, adapter=adapter, max_new_tokens=tokens, timeout=60, **options)
    ids = tuple(i for reply in stream for i in reply.token_ids)
    return ids, served_by(stream)[0]


def server_config(base: Path, roots: dict[str, Path], **options) -> ServerConfig:
    return ServerConfig(
        base_dir=base,
        store_dir=roots["store"],
        adapter_roots=[roots["adapters"]],
        output_roots=[roots["outputs"]],
        port=0,
        limits=Limits(max_new_tokens=512, memory_budget_bytes=256 << 20),
        max_request_bytes=256 << 10,
        **options,
    )


@pytest.fixture(scope="module")
def roots(tok_adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("cluster")
    return {"adapters": tok_adapters[0].parent, "store": top / "store", "outputs": top / "outputs"}


@pytest.fixture(scope="module")
def cluster(tok_base: Path, roots: dict[str, Path]) -> Iterator[Cluster]:
    """Ray (2 CPUs, no dashboard) and the application with 2 replicas (4 adapter keys resident
    each), its gRPC proxy on a free port."""
    import ray
    from ray import serve

    from adapter_fusion.cluster.launch import ClusterConfig, deploy

    config = ClusterConfig(
        server_config(tok_base, roots, token=TOKEN),
        replicas=2,
        port=free_port(),
        http_port=free_port(),
        adapters_per_replica=4,
        health_check_period_s=1.0,
        num_cpus=2,
    )
    try:
        assert deploy(config, object_store_memory=128 << 20, log_to_driver=False)  # Ray started here
        address = f"127.0.0.1:{config.port}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield Cluster(address, config, roots)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tok_base: Path, roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One server on the same base and adapters (its own store): what the cluster must equal."""
    import torch

    own = {**roots, "store": tmp_path_factory.mktemp("reference-store")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica runs (1 CPU): the same kernels, bit for bit
    server = BackgroundServer(server_config(tok_base, own))
    try:
        with Client(server.address) as client:
            yield client
    finally:
        server.stop(grace=0.5)
        torch.set_num_threads(threads)


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    """Poll `condition()` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")
