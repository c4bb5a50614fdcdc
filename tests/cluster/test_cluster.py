"""The cluster over the wire, through Ray Serve's gRPC proxy and the same client as one server:
outputs equal one server's, one catalog for every replica, affinity, a killed replica.

The tests share one deployment and run in file order; the kill comes last.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from tests.cluster.conftest import PROMPTS, TOKEN, Cluster, code_of, generate, served_by, wait_for

pytestmark = pytest.mark.cluster
NAMES = ["alpha", "beta", "gamma", "delta"]  # the directory names of tok_adapters


@pytest.fixture(scope="module")
def loaded(cluster: Cluster, reference: Client) -> Cluster:
    """The four adapters registered through the cluster (and on the reference server)."""
    with cluster.client() as client:
        for name in NAMES:
            client.load_adapter(name, name)
            reference.load_adapter(name, name)
    return cluster


def until_both(call, replicas: int = 2, tries: int = 50) -> dict[str, object]:
    """Call `call()` -> (result, replica id) until every replica answered; returns {replica id:
    result}. Without a routing key Ray picks the replica with the shorter queue as its router
    last saw it (for up to 10 s), so a burst can steer calls to one replica for a while: pause
    between tries."""
    seen: dict[str, object] = {}
    for _ in range(tries):
        result, replica = call()
        seen.setdefault(replica, result)
        if len(seen) == replicas:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"only replicas {sorted(seen)} answered in {tries} tries")


def test_health_reflection_and_refusals(cluster: Cluster) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "adapter_fusion.v1.AdapterFusion"):  # no token needed
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        code, details = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
        assert code == grpc.StatusCode.NOT_FOUND and "unknown service 'nope'" in details
        code, details = code_of(lambda: health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED and "poll Check" in details
        ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask))
        assert "adapter_fusion.v1.AdapterFusion" in {s.name for s in reply.list_services_response.service}
        garbage = channel.unary_unary("/adapter_fusion.v1.AdapterFusion/LoadAdapter")  # name = 0xff 0xfe: not UTF-8
        code, details = code_of(lambda: garbage(b"\x0a\x02\xff\xfe", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in details
    with Client(cluster.address, token=TOKEN) as client:  # the proxy's message cap is max_request_bytes (256 KiB here)
        code, details = code_of(lambda: client.generate(prompt="x" * (300 << 10), max_new_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, details = code_of(lambda: client.generate(prompt="hi", adapter="not\na name", max_new_tokens=2))  # no routing key: the server's answer
        assert code == grpc.StatusCode.NOT_FOUND and "no adapter named 'not\\na name'" in details
    with Client(cluster.address) as anonymous:
        code, details = code_of(anonymous.list_adapters)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
    with Client(cluster.address, token="wrong") as wrong:
        assert code_of(lambda: wrong.generate(prompt="hi", max_new_tokens=2))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_generations_equal_one_server(loaded: Cluster, reference: Client) -> None:
    jobs = [(prompt, name) for name in NAMES for prompt in PROMPTS]  # 16
    expected = [generate(reference, name, prompt, tokens=12)[0] for prompt, name in jobs]
    results: list[tuple[tuple[int, ...], str] | None] = [None] * len(jobs)
    with loaded.client() as client:

        def run(i: int) -> None:
            results[i] = generate(client, jobs[i][1], jobs[i][0], tokens=12)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == expected
        assert len({r[1] for r in results}) == 2  # both replicas served
        examples = [("List three colours.", " red"), ("Count to five.", " one two")]
        assert client.score(examples, adapter="gamma").log_likelihood == reference.score(examples, adapter="gamma").log_likelihood


def test_concurrent_loads_of_one_name_agree_across_replicas(loaded: Cluster, roots) -> None:
    """Two paths race for one name on both replicas: one path wins everywhere, the other is ALREADY_EXISTS."""
    paths = ["alpha", "beta"] * 4
    codes: list[grpc.StatusCode | None] = [None] * len(paths)
    with loaded.client() as client:

        def load(i: int) -> None:
            codes[i] = code_of(lambda: client.load_adapter("race", paths[i]))[0]

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(paths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        winners = {p for p, c in zip(paths, codes) if c == grpc.StatusCode.OK}
        assert len(winners) == 1 and all(c == grpc.StatusCode.ALREADY_EXISTS for p, c in zip(paths, codes) if p not in winners)
        source = str(roots["adapters"] / winners.pop())
        sources = until_both(lambda: _listing(client), tries=40)
        assert all(listing["race"] == source for listing in sources.values())
        client.unload_adapter("race")


def _listing(client: Client) -> tuple[dict[str, str], str]:
    reply, call = client.stub.ListAdapters.with_call(pb.ListAdaptersRequest(), metadata=client.metadata)
    return {a.name: a.source for a in reply.adapters}, served_by(call)[0]


def test_a_composed_adapter_serves_on_both_replicas(loaded: Cluster, reference: Client) -> None:
    recipe = make_recipe("svd", {"alpha": 1.0, "beta": 0.5}, rank=4)
    with loaded.client() as client, loaded.client(multiplex=False) as scattered:
        client.compose("mix", recipe)
        reference.compose("mix", recipe)
        expected = generate(reference, "mix")[0]
        outputs = until_both(lambda: generate(scattered, "mix"))  # random routing reaches both replicas
        assert set(outputs.values()) == {expected}
        assert client.compose("mix", recipe).report == []  # the same recipe again: a no-op, whichever replica answers


def test_unload_is_seen_by_every_replica(loaded: Cluster, reference: Client) -> None:
    with loaded.client() as client, loaded.client(multiplex=False) as scattered:
        client.load_adapter("temp", "gamma")
        until_both(lambda: generate(scattered, "temp"))  # both replicas have used it
        client.unload_adapter("temp")
        for _ in range(10):
            code, details = code_of(lambda: scattered.generate(prompt=PROMPTS[1], adapter="temp", max_new_tokens=2))
            assert code == grpc.StatusCode.NOT_FOUND and "no adapter named 'temp'" in details
        listings = until_both(lambda: _listing(scattered))
        assert all("temp" not in listing and set(NAMES) <= set(listing) for listing in listings.values())
        client.load_adapter("temp", "delta")  # the name again, another adapter: every replica drops what it had
        outputs = until_both(lambda: generate(scattered, "temp"))
        assert set(outputs.values()) == {generate(reference, "delta")[0]}
        client.unload_adapter("temp")


def test_exports_keep_to_the_write_roots(loaded: Cluster) -> None:
    roots = loaded.roots
    with loaded.client() as client:
        out = client.export_adapter("alpha", "alpha-export")
        assert out.path == str(roots["outputs"] / "alpha-export") and (roots["outputs"] / "alpha-export" / "adapter_config.json").is_file()
        code, details = code_of(lambda: client.export_adapter("alpha", "alpha-export"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        for hostile in ("../escape", str(roots["store"] / "alpha"), str(roots["store"])):
            code, details = code_of(lambda: client.export_adapter("alpha", hostile))
            assert code == grpc.StatusCode.PERMISSION_DENIED, hostile
    assert not (roots["outputs"].parent / "escape").exists()
    assert sorted(p.name for p in roots["store"].iterdir() if not p.name.startswith(".")) == sorted(NAMES + ["mix"])  # nothing written there


def test_requests_follow_residency(loaded: Cluster) -> None:
    """After one warm-up request per adapter, every request for it lands on a replica that holds
    it: no replica loads anything more. Random routing, on fresh names, spreads names over both."""
    with loaded.client() as client, loaded.client(multiplex=False) as scattered:
        for i, name in enumerate(NAMES):
            client.load_adapter(f"aff-{i}", name)
            client.load_adapter(f"rand-{i}", name)
        holder = {}
        for i in range(4):
            holder[f"aff-{i}"] = generate(client, f"aff-{i}")[1]
            time.sleep(0.5)  # the replica reports what it holds every 0.1 s; Ray's routers learn it from the controller
        loads: dict[str, set[int]] = {}
        for _ in range(3):
            for key, replica in holder.items():
                stream = client.generate(prompt=PROMPTS[2], adapter=key, max_new_tokens=4, timeout=60)
                list(stream)
                served, count = served_by(stream)
                assert served == replica, f"{key} went to {served}, not to {replica} which holds it"
                loads.setdefault(served, set()).add(count)
        assert all(len(counts) == 1 for counts in loads.values()), loads  # no load after the warm-up
        pairs = {(f"rand-{i}", generate(scattered, f"rand-{i}")[1]) for i in range(4) for _ in range(4)}
        assert len(pairs) > 4  # some name went to both replicas, so it was loaded twice


def test_a_killed_replica_fails_its_streams_with_unavailable_and_is_replaced(loaded: Cluster, reference: Client) -> None:
    import ray

    with loaded.client() as client, loaded.client(multiplex=False) as scattered:
        tail = list(reference.generate(prompt=PROMPTS[0], adapter="alpha", max_new_tokens=512))[-1]
        assert tail.finish_reason == "length"  # a 512-token stream: long enough to be cut
        replicas = set(until_both(lambda: _listing(scattered)))
        client.load_adapter("doomed", "alpha")  # a fresh name: after one request exactly one replica holds it
        victim = generate(client, "doomed")[1]
        time.sleep(0.5)  # until Ray's routers know where "doomed" is resident
        actor = ray.get_actor(f"SERVE_REPLICA::{loaded.config.app_name}#Replica#{victim}", namespace="serve")
        pid = ray.get(actor.is_allocated.remote())[0]  # Ray Serve's own liveness probe; it returns the pid first
        stream = client.generate(prompt=PROMPTS[0], adapter="doomed", max_new_tokens=512, timeout=60)
        next(iter(stream))
        os.kill(pid, signal.SIGKILL)
        code, details = code_of(lambda: list(stream))
        assert code == grpc.StatusCode.UNAVAILABLE and "stopped before it finished; retry" in details
        for name in NAMES + ["mix", "doomed"]:  # the survivor serves everything at once, loading from the store
            assert generate(client, name)[0] == generate(reference, name if name != "doomed" else "alpha")[0]
        replacement = wait_for(lambda: {_listing(scattered)[1]} - replicas, 120, "a replacement replica").pop()

        def from_replacement() -> dict[str, str] | None:
            listing, replica = _listing(scattered)
            return listing if replica == replacement else None

        listing = wait_for(from_replacement, 60, "a listing from the replacement")
        assert set(NAMES + ["mix", "doomed"]) <= set(listing)  # no registered adapter lost
        outputs = until_both(lambda: generate(scattered, "beta"))
        assert replacement in outputs and set(outputs.values()) == {generate(reference, "beta")[0]}
