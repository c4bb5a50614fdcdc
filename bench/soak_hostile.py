"""Soak with hostile tenants: normal streams (each client on its own connection) run through
phases, quiet and then beside one hostile tenant each: many stop strings, a big Score, a LoraHub
search cancelled mid-way, one connection flooding Generates, a learned composition of the attack's
size, 300 silent sockets that send only the HTTP/2 preface, 4 sockets flooding PINGs. Reports the normal streams' first-token
time and inter-token gap (p50, p99) per phase and the p99s against the quiet phase (target: <= 2x).
The server is `adapter-fusion serve` in its own process, so the clients' threads do not share its GIL.

    python -m bench.soak_hostile [--seconds 20] [--base tiny|smollm2]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc

from adapter_fusion.engines.builtin import Limits
from adapter_fusion.models import default_base, tiny_llama
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from bench.soak import adapters

PHASES = ["quiet", "stop-strings", "big-score", "search-cancel", "flood", "fit-attack", "silent", "ping-flood", "quiet again"]  # quiet twice: the machine's drift
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # each client its own connection (its own peer)
PROMPT = "Tell me about rivers and stones."
DEADLINE = 120.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = bytes.fromhex("000000040000000000")  # an empty SETTINGS frame
PING = bytes.fromhex("000008060000000000") + bytes(8)  # PING, 8 bytes of opaque data, stream 0


class Soak:
    def __init__(self, address: str, seconds: float, attack_interval_s: float = 1.0) -> None:
        self.address, self.seconds, self.attack_interval_s = address, seconds, attack_interval_s
        self.phase = ""
        self.done = False
        self.first: dict[str, list[float]] = defaultdict(list)
        self.gaps: dict[str, list[float]] = defaultdict(list)
        self.hostile: dict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))

    def stub(self) -> tuple[grpc.Channel, pb_grpc.AdapterFusionStub]:
        channel = grpc.insecure_channel(self.address, options=OWN_CONNECTION)
        return channel, pb_grpc.AdapterFusionStub(channel)

    def count(self, phase: str, what: str, n: int = 1) -> None:
        self.hostile[phase][what] += n

    # ---- the normal tenants ------------------------------------------------------------------

    def normal(self, adapter: str) -> None:
        channel, stub = self.stub()
        while not self.done:
            phase, start, last = self.phase, time.perf_counter(), None
            try:
                for reply in stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=adapter, max_new_tokens=24), timeout=DEADLINE):
                    now = time.perf_counter()
                    if reply.token_ids and phase == self.phase:
                        if last is None:
                            self.first[phase].append(now - start)
                        else:
                            self.gaps[phase].append(now - last)
                        last = now
            except grpc.RpcError as error:
                self.count(phase, f"normal {error.code().name}")
        channel.close()

    # ---- the hostile tenants, each active in its own phase -------------------------------------

    def stop_strings(self) -> None:
        channel, stub = self.stub()
        at_cap = [f"\u2603{i:02d}" + "x" * 57 for i in range(16)]  # 16 stops, 1,024 bytes: the caps
        huge = [f"stop-{i:06d}-stop-stop-stop-stop" for i in range(95_000)]
        while not self.done:
            if self.phase != "stop-strings":
                time.sleep(0.05)
                continue
            phase = self.phase
            try:
                stub.Generate(pb.GenerateRequest(prompt=PROMPT, stop=huge), timeout=DEADLINE).next()
            except grpc.RpcError as error:
                self.count(phase, f"95,000 stops: {error.code().name}")
            calls = [stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=200, stop=at_cap), timeout=DEADLINE) for _ in range(4)]
            for call in calls:
                try:
                    self.count(phase, "16 stops: tokens", sum(len(r.token_ids) for r in call))
                except grpc.RpcError as error:
                    self.count(phase, f"16 stops: {error.code().name}")
        channel.close()

    def big_score(self) -> None:
        channel, stub = self.stub()
        request = pb.ScoreRequest(examples=[pb.Example(input="hello world " * 75, target=f"the end {i}") for i in range(96)], raw=True)
        while not self.done:
            if self.phase != "big-score":
                time.sleep(0.05)
                continue
            phase, start = self.phase, time.perf_counter()
            stub.Score(request, timeout=DEADLINE)
            self.count(phase, "Scores of 96 x ~150 tokens")
            self.count(phase, "Score ms", int((time.perf_counter() - start) * 1000))
        channel.close()

    def search_cancel(self, sources: list[str]) -> None:
        channel, stub = self.stub()
        examples = [pb.Example(input=f"{'stones and rivers in the valley ' * 10} {i}", target="calm water") for i in range(64)]
        request = pb.SearchWeightsRequest(adapters=sources, examples=examples, output_name="searched", budget=64, parallel=16, raw=True)
        while not self.done:
            if self.phase != "search-cancel":
                time.sleep(0.05)
                continue
            call = stub.SearchWeights(request, timeout=DEADLINE)
            time.sleep(1.0)  # it is scoring by now
            call.cancel()
            self.count("search-cancel", "searches cancelled after 1 s")
        channel.close()

    def flood(self) -> None:
        channel, stub = self.stub()  # one connection for all of them
        while not self.done:
            if self.phase != "flood":
                time.sleep(0.05)
                continue
            calls = [stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=64), timeout=DEADLINE) for _ in range(1000)]
            for call in calls:
                if self.phase != "flood":
                    call.cancel()  # its phase is over: nothing of it spills into the next
                try:
                    self.count("flood", "flood tokens", sum(len(r.token_ids) for r in call))
                except grpc.RpcError as error:
                    self.count("flood", f"flood {error.code().name}")
        channel.close()

    def fit_attack(self, sources: list[str]) -> None:
        """The learned composition that got a server OOM-killed: 256 examples of ~1,900 + ~500 tokens, 1,000 steps."""
        channel, stub = self.stub()
        examples = [pb.Example(input="word " * 1900, target="answer " * 500) for _ in range(256)]
        recipe = pb.Recipe(method="learned", sources=[pb.Source(adapter=a, weight=0.5) for a in sources], parameters={"steps": 1000}, examples=examples)
        while not self.done:
            if self.phase != "fit-attack":
                time.sleep(0.05)
                continue
            try:
                stub.ComposeAdapter(pb.ComposeAdapterRequest(name="attack", recipe=recipe), timeout=30)
                self.count("fit-attack", "learned attack OK")
            except grpc.RpcError as error:
                self.count("fit-attack", f"learned attack {error.code().name}")
            time.sleep(self.attack_interval_s)  # one attack a second: its own cost, not a flood of 3.3 MB requests
        channel.close()

    def silent(self, count: int = 300) -> None:
        """Sockets that send the preface and nothing more; each one the server closes is opened again."""
        held: list[socket.socket] = []
        while not self.done:
            if self.phase != "silent":
                for s in held:
                    s.close()
                held = []
                time.sleep(0.05)
                continue
            while len(held) < count:
                try:
                    held.append(socket.create_connection(self._host_port(), timeout=1))
                    held[-1].sendall(PREFACE)
                    held[-1].setblocking(False)
                except OSError:
                    self.count("silent", "connect refused")
                    break
            for s in list(held):
                try:
                    if s.recv(65536) != b"":  # the server's SETTINGS: still open
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                s.close()
                held.remove(s)
                self.count("silent", "closed by the server")
            time.sleep(0.1)

    def ping_flood(self) -> None:
        """One raw connection sending PING frames and never reading the ACKs."""
        while not self.done:
            if self.phase != "ping-flood":
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection(self._host_port(), timeout=1) as s:
                    s.sendall(PREFACE + SETTINGS)
                    while self.phase == "ping-flood":
                        try:
                            s.sendall(PING * 64)
                            self.count("ping-flood", "PINGs sent", 64)
                        except TimeoutError:
                            continue  # the server stopped reading; try again while the phase lasts
            except OSError:
                self.count("ping-flood", "connections ended")

    def _host_port(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)

    # ---- the run ------------------------------------------------------------------------------

    def run(self, sources: list[str]) -> None:
        workers = [threading.Thread(target=self.normal, args=(a,)) for a in (None, sources[0], sources[1], None)]
        workers += [threading.Thread(target=f) for f in (self.stop_strings, self.big_score, self.flood)]
        workers += [threading.Thread(target=self.search_cancel, args=(sources,)), threading.Thread(target=self.fit_attack, args=(sources,))]
        workers += [threading.Thread(target=self.silent)] + [threading.Thread(target=self.ping_flood) for _ in range(4)]
        for w in workers:
            w.start()
        for phase in PHASES:
            self.phase = phase
            time.sleep(self.seconds)
        self.phase, self.done = "drain", True
        for w in workers:
            w.join(timeout=2 * DEADLINE)

    def report(self) -> str:
        def p(values: list[float], q: int) -> float:
            return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")

        quiet_first, quiet_gap = p(self.first["quiet"], 99), p(self.gaps["quiet"], 99)
        lines = ["phase          streams  first p50/p99 ms   gap p50/p99 ms   p99 vs quiet (first, gap)   hostile"]
        for phase in PHASES:
            first, gaps = self.first[phase], self.gaps[phase]
            ratio = f"{p(first, 99) / quiet_first:4.1f}x, {p(gaps, 99) / quiet_gap:4.1f}x"
            hostile = "; ".join(f"{k} {v}" for k, v in sorted(self.hostile[phase].items())) or "-"
            lines.append(f"{phase:<14} {len(first):>7}  {p(first, 50):7.0f} / {p(first, 99):6.0f}   {p(gaps, 50):6.0f} / {p(gaps, 99):6.0f}   {ratio:>26}   {hostile}")
        return "\n".join(lines)


def wait_address(log: Path, server: subprocess.Popen, timeout: float = 300) -> str:
    """The address `serve` logs once it listens (it binds port 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        match = re.search(r"adapter-fusion serving \S+ on (127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        time.sleep(0.1)
    raise SystemExit(f"adapter-fusion serve did not start:\n{log.read_text(errors='replace')[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="per phase")
    parser.add_argument("--base", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--max-job-tokens", type=int, default=Limits().max_job_tokens)
    parser.add_argument("--attack-interval", type=float, default=1.0, help="seconds between learned attacks (0: back to back)")
    args = parser.parse_args()
    limits = Limits(max_job_tokens=args.max_job_tokens)
    with tempfile.TemporaryDirectory(prefix="soak-hostile-") as holder:
        work = Path(holder)
        base = default_base() if args.base == "smollm2" else tiny_llama(work / "tiny", tokenizer_from=default_base(), layers=4, hidden=128)
        dirs = adapters(base, work / "adapters", 2)
        command = [sys.executable, "-m", "adapter_fusion.cli", "serve", "--base", str(base), "--store", str(work / "store"), "--port", "0",
                   "--adapter-root", str(work / "adapters"), "--output-root", str(work / "out"), "--max-job-tokens", str(limits.max_job_tokens)]
        log = work / "serve.log"
        with open(log, "w") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            address = wait_address(log, server)
            with grpc.insecure_channel(address) as channel:
                for d in dirs:
                    pb_grpc.AdapterFusionStub(channel).LoadAdapter(pb.LoadAdapterRequest(name=d.name, path=d.name), timeout=DEADLINE)
            soak = Soak(address, args.seconds, args.attack_interval)
            soak.run([d.name for d in dirs])
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"base {args.base}, default limits but max_job_tokens {limits.max_job_tokens}, {args.seconds:.0f} s per phase, 4 normal clients (24-token streams, each its own connection)")
    print(soak.report())


if __name__ == "__main__":
    main()
