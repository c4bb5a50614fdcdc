"""The cluster on Ray Serve, in one run on this machine (SmolLM2, 4 demo adapters):

  throughput: the same mixed workload (requests over 4 adapters, greedy, N concurrent clients)
  through 1 replica and through 2 replicas (1 CPU each), tokens/s end to end over gRPC;
  routing: 2 replicas keeping 2 adapters resident each (4 slots for 4 adapters), the workload
  with the client's routing key (Ray Serve multiplexing) and without it (Ray's default
  power-of-two-choices), counting the adapter loads every replica reports.

Each arm gets a fresh deployment whose store already holds the adapters (registered, nothing
resident), so every load counted is one the routing caused.

    python bench/cluster.py [--requests 96] [--tokens 32] [--clients 8] [--output bench/results/cluster.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import serve

from adapter_fusion.adapters import load_adapter
from adapter_fusion.client import Client
from adapter_fusion.cluster.launch import ClusterConfig, deploy
from adapter_fusion.routing import LOADS_KEY, REPLICA_KEY
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.models import DEMO_ADAPTERS, default_base
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.server.app import ServerConfig
from adapter_fusion.server.store import AdapterStore

ADAPTERS = ["uppercase", "reverse_words", "kv_json", "number_to_words"]
TOKEN = "bench"
TOPICS = "rivers stones clouds music paper lights tables windows".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n: int) -> list[tuple[str, str]]:
    """(prompt, adapter) pairs, adapters interleaved so every batch mixes them."""
    return [(f"Write a long story about {TOPICS[i % len(TOPICS)]} and the sea.", ADAPTERS[i % len(ADAPTERS)]) for i in range(n)]


def registered_store(root: Path) -> Path:
    """A store holding the adapters, as after LoadAdapter and a restart: registered, not resident."""
    store = AdapterStore(root / "store")
    for name in ADAPTERS:
        adapter = load_adapter(DEMO_ADAPTERS / name, name)
        store.save(adapter, AdapterInfo.of(adapter, str(DEMO_ADAPTERS / name), pinned=False))
    return store.root


def run(address: str, jobs: list[tuple[str, str]], tokens: int, clients: int, multiplex: bool) -> dict:
    """Send the jobs from `clients` threads; tokens/s, and each replica's last reported load count."""
    todo = list(reversed(jobs))
    lock = threading.Lock()
    done_tokens, loads = [0], {}

    def client_loop() -> None:
        with Client(address, token=TOKEN, multiplex=multiplex) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt, adapter = todo.pop()
                stream = client.generate(messages=[{"role": "user", "content": prompt}], adapter=adapter, max_new_tokens=tokens, timeout=600)
                last = list(stream)[-1]
                meta = dict(stream.trailing_metadata())
                with lock:
                    done_tokens[0] += last.usage.completion_tokens
                    loads[meta[REPLICA_KEY]] = max(loads.get(meta[REPLICA_KEY], 0), int(meta[LOADS_KEY]))

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"tokens": done_tokens[0], "seconds": seconds, "tok_s": done_tokens[0] / seconds, "loads": loads}


def arm(base: Path, ports: tuple[int, int], replicas: int, per_replica: int, multiplex: bool, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerConfig(
            base_dir=base, store_dir=registered_store(Path(tmp)), adapter_roots=[DEMO_ADAPTERS], output_roots=[Path(tmp) / "out"],
            token=TOKEN, limits=Limits(max_new_tokens=args.tokens),
        )
        config = ClusterConfig(server, replicas, port=ports[0], http_port=ports[1], adapters_per_replica=per_replica)  # Serve keeps the ports it started with
        started = time.perf_counter()
        deploy(config)
        ready = time.perf_counter() - started
        address = f"127.0.0.1:{config.port}"
        run(address, [("Say hi.", None)] * 4, 4, 2, True)  # warm the path (base model only: loads nothing)
        result = run(address, workload(args.requests), args.tokens, args.clients, multiplex)
        serve.delete(config.app_name)
    result["ready_s"] = ready
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cluster.txt")
    args = parser.parse_args()
    base = default_base()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ports = (free_port(), free_port())
    try:
        one = arm(base, ports, 1, 8, True, args)
        two = arm(base, ports, 2, 8, True, args)
        keyed = arm(base, ports, 2, 2, True, args)
        unkeyed = arm(base, ports, 2, 2, False, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    lines = [
        f"SmolLM2-135M, {len(ADAPTERS)} demo adapters, {args.requests} chat requests x <= {args.tokens} tokens, greedy, "
        f"{args.clients} concurrent clients, Ray Serve gRPC proxy -> ingress -> replica (1 CPU each); "
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "throughput (adapters resident everywhere they are needed: 8 keys per replica)",
        f"  1 replica    {one['tok_s']:6.1f} tok/s  ({one['tokens']} tokens in {one['seconds']:.1f} s; deploy {one['ready_s']:.0f} s)",
        f"  2 replicas   {two['tok_s']:6.1f} tok/s  ({two['tokens']} tokens in {two['seconds']:.1f} s; deploy {two['ready_s']:.0f} s)"
        f"  = {two['tok_s'] / one['tok_s']:.2f}x",
        "routing (2 replicas, 2 adapters resident each: 4 slots for 4 adapters)",
        f"  routing key (multiplexed)   {sum(keyed['loads'].values()):3d} adapter loads  per replica {sorted(keyed['loads'].values())}  {keyed['tok_s']:6.1f} tok/s",
        f"  no key (power of two)       {sum(unkeyed['loads'].values()):3d} adapter loads  per replica {sorted(unkeyed['loads'].values())}  {unkeyed['tok_s']:6.1f} tok/s",
    ]
    if len(os.sched_getaffinity(0)) < 4:
        lines.append(
            "note: each replica reserves 1 of these cores; Ray's proxy, the ingress, Ray's control plane and the clients share the rest, "
            "so replica scaling cannot show here (a core per replica and one for the rest would); the load counts do not depend on cores"
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.write_text(text)


if __name__ == "__main__":
    main()
