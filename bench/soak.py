"""Soak: 16 concurrent Generate streams over 8 adapters while another client loads, composes and
unloads in a loop and a third polls health every 50 ms; every call has a deadline.

    python bench/soak.py [--seconds 180] [--base smollm2]

Reports hangs (a call past its deadline), mixed outputs that differ from the same adapter's
sequential greedy output, health latency p50/p99, and this process's RSS over time (VmRSS of the
one process that holds the in-process server and every client thread: not the server's alone),
first minute vs last minute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.models import default_base, tiny_llama
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import BackgroundServer, ServerConfig

PROMPTS = ["Tell me about rivers.", "Count the stones.", "Name a colour.", "Describe the sea."]
DEADLINE = 60.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def adapters(base: Path, root: Path, n: int) -> list[Path]:
    """Near-base random adapters (small B): they never stop early, every row writes its tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--base", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    holder = tempfile.TemporaryDirectory(prefix="soak-")  # removed at the end: bakes of nothing, but adapters and a store
    work = Path(holder.name)
    base = default_base() if args.base == "smollm2" else tiny_llama(work / "tiny", tokenizer_from=default_base(), layers=4, hidden=128)
    dirs = adapters(base, work / "adapters", 8)
    server = BackgroundServer(ServerConfig(base_dir=base, store_dir=work / "store", adapter_roots=[work / "adapters"], output_roots=[work / "out"], port=0))
    stop = time.monotonic() + args.seconds
    hangs, mismatches, streams, churn_ops, errors = [0], [0], [0], [0], []
    health_ms: list[float] = []
    rss: list[tuple[float, float]] = []
    with Client(server.address) as setup:
        for i, d in enumerate(dirs):
            setup.stub.LoadAdapter(pb.LoadAdapterRequest(name=f"a{i}", path=d.name), timeout=DEADLINE)
        expected = {(i, p): setup.chat(p, adapter=f"a{i}", max_new_tokens=args.tokens, timeout=DEADLINE) for i in range(8) for p in PROMPTS}

    def generate(worker: int) -> None:
        with Client(server.address) as client:
            k = worker
            while time.monotonic() < stop:
                i, prompt = k % 8, PROMPTS[k % len(PROMPTS)]
                k += 16
                try:
                    text = client.chat(prompt, adapter=f"a{i}", max_new_tokens=args.tokens, timeout=DEADLINE)
                    streams[0] += 1
                    mismatches[0] += text != expected[(i, prompt)]
                except grpc.RpcError as error:
                    failed(error)

    def failed(error: grpc.RpcError) -> None:  # a deadline reached is a hang; anything else is an error, both reported
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            hangs[0] += 1
        else:
            errors.append(f"{error.code().name}: {error.details()}")

    def churn() -> None:
        with Client(server.address) as client:
            n = 0
            while time.monotonic() < stop:
                try:
                    client.stub.LoadAdapter(pb.LoadAdapterRequest(name="churn", path="a0"), timeout=DEADLINE)
                    recipe = make_recipe("svd", {"churn": 0.5, "a1": 0.5}, rank=8)
                    client.stub.ComposeAdapter(pb.ComposeAdapterRequest(name=f"mix{n % 3}", recipe=recipe), timeout=DEADLINE)
                    client.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=f"mix{n % 3}"), timeout=DEADLINE)
                    client.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="churn"), timeout=DEADLINE)
                    churn_ops[0] += 4
                except grpc.RpcError as error:
                    failed(error)
                n += 1

    def health() -> None:
        start = time.monotonic()
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE).status
                    health_ms.append((time.perf_counter() - t) * 1000)
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        errors.append(f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
                except grpc.RpcError as error:
                    failed(error)
                rss.append((time.monotonic() - start, rss_mb()))
                time.sleep(0.05)

    threads = [threading.Thread(target=generate, args=(w,)) for w in range(16)] + [threading.Thread(target=churn), threading.Thread(target=health)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.seconds + 2 * DEADLINE)  # every call has a deadline: a thread still alive after this is a hang
    stuck = sum(t.is_alive() for t in threads)
    server.stop()
    holder.cleanup()
    q = statistics.quantiles(health_ms, n=100)
    first = [m for s, m in rss if s < 60]
    last = [m for s, m in rss if s > rss[-1][0] - 60]
    print(f"base {args.base}, {args.seconds:.0f} s: {streams[0]} streams, {churn_ops[0]} load/compose/unload calls, hangs {hangs[0] + stuck}, "
          f"mixed outputs differing from sequential greedy {mismatches[0]}, other errors {len(errors)} {errors[:5]}")
    print(f"health: {len(health_ms)} checks, p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms")
    print(f"RSS of the soak process (server and clients): first minute mean {statistics.mean(first):.0f} MB, last minute mean {statistics.mean(last):.0f} MB, max {max(m for _, m in rss):.0f} MB")
    buckets = {}
    for second, mb in rss:
        buckets.setdefault(int(second // 30) * 30, []).append(mb)
    print("RSS by 30 s: " + ", ".join(f"{t}s {statistics.median(v):.0f}" for t, v in sorted(buckets.items())))
    raise SystemExit(1 if hangs[0] + stuck + mismatches[0] + len(errors) else 0)


if __name__ == "__main__":
    main()
