"""No request slows everyone else: a normal stream's first token and inter-token gaps stay within
a bound measured in the same test while a hostile request runs (many stop strings, a big Score, a
cancelled SearchWeights, one connection flooding Generates), and the caps refuse what they cap.

Bounds are derived from baselines each test measures first on the same server: a normal stream
alone (or beside the same number of plain requests) and one token-budget piece of scoring."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from adapter_fusion.engines.builtin import Limits
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.v1 import adapter_fusion_pb2_grpc as pb_grpc
from adapter_fusion.server.app import ServerConfig

from .conftest import PROMPT, RPC_TIMEOUT, bump, code_of, serving

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: its own connection, its own peer
LONG_INPUT = "hello world " * 200  # ~400 tokens: one example per scoring piece of 512 tokens
FIGURES_KEY = "fairness_cases"


def config(tmp_path: Path, tok_base: Path, **limits) -> ServerConfig:
    return ServerConfig(
        base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[tmp_path / "adapters"], output_roots=[tmp_path / "out"], port=0,
        limits=Limits(**limits),
    )


@contextmanager
def stub_on_own_connection(address: str) -> Iterator[pb_grpc.AdapterFusionStub]:
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        yield pb_grpc.AdapterFusionStub(channel)


def arrivals(stub: pb_grpc.AdapterFusionStub, tokens: int, stop: tuple[str, ...] = (), timeout: float = RPC_TIMEOUT) -> list[float]:
    """Seconds from the call to each message carrying tokens (the first is the first-token time)."""
    start, times = time.perf_counter(), []
    for reply in stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=tokens, stop=list(stop)), timeout=timeout):
        if reply.token_ids:
            times.append(time.perf_counter() - start)
    assert times, "the stream sent no tokens"
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


class Forwards:
    """Every forward the engine runs once `arm()`ed: (input length, seconds). `started` is set by
    the first, the moment the engine began some work. Pieces timed here, beside the stream, move
    with the machine's load as the stream's gaps do."""

    def __init__(self, server) -> None:
        self.started = threading.Event()
        self.finished = threading.Event()  # set by the first forward to end
        self.armed = False
        self.times: list[tuple[int, float]] = []
        self._began = 0.0
        model = server.running.engine.runtime.model
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args) -> None:
        self._began = time.perf_counter()
        if self.armed:
            self.started.set()

    def _post(self, module, args, kwargs, output) -> None:
        if self.armed:
            self.times.append((kwargs["input_ids"].shape[-1], time.perf_counter() - self._began))
            self.finished.set()

    def arm(self) -> None:
        self.armed = True

    def longest(self, min_length: int) -> float:
        """The longest forward over at least `min_length` positions (a scoring piece, not a decode step)."""
        return max((t for n, t in self.times if n >= min_length), default=0.0)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_stop_strings_are_capped_before_any_work(tmp_path: Path, tok_base: Path) -> None:
    with serving(config(tmp_path, tok_base)) as server, stub_on_own_connection(server.address) as stub:
        limits = Limits()
        too_many = [f"#{i}#" for i in range(limits.max_stop_strings + 1)]
        code, details = code_of(lambda: stub.Generate(pb.GenerateRequest(prompt=PROMPT, stop=too_many), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == f"{limits.max_stop_strings + 1} stop strings; the limit is {limits.max_stop_strings}"
        too_long = ["x" * 600, "y" * 600]
        code, details = code_of(lambda: stub.Generate(pb.GenerateRequest(prompt=PROMPT, stop=too_long), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == f"the stop strings are 1200 bytes together; the limit is {limits.max_stop_bytes}"
        huge = [f"stop-{i:06d}-stop-stop-stop-stop" for i in range(95_000)]  # the 3.8 MB attack, under the size cap
        start = time.perf_counter()
        code, details = code_of(lambda: stub.Generate(pb.GenerateRequest(prompt=PROMPT, stop=huge), timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == f"95000 stop strings; the limit is {limits.max_stop_strings}"
        print(f"95,000 stop strings refused in {time.perf_counter() - start:.2f} s (the transfer included)")
        assert arrivals(stub, 4, stop=("#never#",) * limits.max_stop_strings)  # at the caps: served
        bump(FIGURES_KEY, 3)


def test_many_stop_strings_do_not_slow_other_streams(tmp_path: Path, tok_base: Path) -> None:
    """Four requests with 4,000 stop strings each (caps raised to allow them) beside a normal
    stream: its median gap is within 2x of the same stream beside four plain requests (the best
    of two alternated runs each)."""
    stops = tuple(f"\u2603{i:05d}\u2603" for i in range(4000))  # never in the output: matched every step, never hit
    with serving(config(tmp_path, tok_base, max_stop_strings=5000, max_stop_bytes=1 << 20)) as server:
        with stub_on_own_connection(server.address) as normal, stub_on_own_connection(server.address) as other:
            arrivals(normal, 8)  # warm

            def beside(stop: tuple[str, ...]) -> float:
                calls = [other.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=400, stop=list(stop)), timeout=RPC_TIMEOUT) for _ in range(4)]
                for call in calls:
                    next(call)  # each one decoding (its first text streamed)
                try:
                    return statistics.median(gaps(arrivals(normal, 40)))
                finally:
                    for call in calls:
                        call.cancel()

            beside(())  # warm: the first batch of five is slower
            runs = [(beside(()), beside(stops)) for _ in range(2)]  # alternated: the machine's load moves both alike
            plain, hostile = min(p for p, _ in runs), min(h for _, h in runs)
        print(f"normal stream's median gap: {plain * 1e3:.1f} ms beside plain requests, {hostile * 1e3:.1f} ms beside 4 x 4,000 stop strings")
        assert hostile <= 2 * plain, f"many stop strings slowed another stream {hostile / plain:.1f}x"
        bump(FIGURES_KEY)


def test_a_big_score_leaves_streams_their_turn(tmp_path: Path, tok_base: Path) -> None:
    """A Score of 200 examples x ~400 tokens runs in token-bounded pieces between decode steps: a
    stream started meanwhile gets its first token, and every next one, within a bound of a few
    of the pieces and steps timed beside it (before the fix: after the whole Score)."""
    with serving(config(tmp_path, tok_base, max_batch=8)) as server:
        with stub_on_own_connection(server.address) as normal, stub_on_own_connection(server.address) as hostile:
            alone = arrivals(normal, 30)
            forwards = Forwards(server)
            big = pb.ScoreRequest(examples=[pb.Example(input=LONG_INPUT, target=f"the end {i}") for i in range(200)], raw=True)
            outcome: list[object] = []
            worker = threading.Thread(target=lambda: outcome.append(code_of(lambda: hostile.Score(big, timeout=RPC_TIMEOUT))))
            try:
                forwards.arm()
                worker.start()
                assert forwards.started.wait(RPC_TIMEOUT), "the Score never reached the engine"
                during = arrivals(normal, 30)
                beside = worker.is_alive()  # the Score still running when the stream ended
            finally:
                worker.join(RPC_TIMEOUT)
                forwards.close()
        assert outcome == [(grpc.StatusCode.OK, "")]
        piece, step = forwards.longest(300), max(t for n, t in forwards.times if n == 1)
        bound = max(alone[0], max(gaps(alone))) + 4 * (piece + step)
        print(f"longest piece {piece * 1e3:.0f} ms, step {step * 1e3:.0f} ms; first token {alone[0] * 1e3:.0f} ms alone, "
              f"{during[0] * 1e3:.0f} ms beside the Score; max gap {max(gaps(alone)) * 1e3:.0f} ms alone, "
              f"{max(gaps(during)) * 1e3:.0f} ms beside (bound {bound * 1e3:.0f} ms)")
        assert during[0] <= bound, f"first token after {during[0]:.2f} s beside a big Score (bound {bound:.2f} s)"
        assert max(gaps(during)) <= bound, f"a {max(gaps(during)):.2f} s gap beside a big Score (bound {bound:.2f} s)"
        assert beside, "the Score ended before the stream did: its gaps were not all measured beside it"
        bump(FIGURES_KEY)


def test_a_cancelled_search_frees_the_engine_at_once(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """LoraHub with 64 examples, parallel 16 (1,024 rows an evaluation): cancelled while the
    engine scores it, every queued piece leaves, and the next Generate is served as if alone."""
    for path in tok_adapters[:2]:
        shutil.copytree(path, tmp_path / "adapters" / path.name)
    with serving(config(tmp_path, tok_base)) as server, stub_on_own_connection(server.address) as stub:
        for path in tok_adapters[:2]:
            stub.LoadAdapter(pb.LoadAdapterRequest(name=path.name, path=path.name), timeout=RPC_TIMEOUT)
        alone = arrivals(stub, 4)[-1]
        examples = [pb.Example(input=f"{'stones and rivers ' * 40} {i}", target="calm water") for i in range(64)]
        request = pb.SearchWeightsRequest(
            adapters=[p.name for p in tok_adapters[:2]], examples=examples, output_name="searched", budget=64, parallel=16, raw=True
        )
        forwards = Forwards(server)
        try:
            forwards.arm()
            call = stub.SearchWeights(request, timeout=RPC_TIMEOUT)
            assert forwards.finished.wait(RPC_TIMEOUT), "the search never reached the engine"
            call.cancel()
            cancelled_at = time.perf_counter()
            after = arrivals(stub, 4, timeout=20)[-1]
            served = time.perf_counter() - cancelled_at
        finally:
            forwards.close()
        piece = forwards.longest(50)  # the search's pieces, timed before the cancel
        bound = 4 * (alone + piece)
        print(f"longest piece {piece * 1e3:.0f} ms; 4-token Generate: {alone * 1e3:.0f} ms alone, {after * 1e3:.0f} ms right after the cancel ({served * 1e3:.0f} ms from it); "
              f"bound {bound * 1e3:.0f} ms")
        assert served <= bound, f"the next Generate finished {served:.2f} s after the cancel (bound {bound:.2f} s)"
        engine = server.running.engine
        assert not engine.scheduler._jobs and engine.stats["faults"] == 0  # nothing of the search left queued
        assert code_of(lambda: stub.ListAdapters(pb.ListAdaptersRequest(), timeout=RPC_TIMEOUT))[0] == grpc.StatusCode.OK
        bump(FIGURES_KEY)


def test_one_connection_cannot_take_every_row_or_queue_place(tmp_path: Path, tok_base: Path) -> None:
    """100 concurrent Generates on one connection (8 rows, 64 queue places): it gets 6 rows and
    16 places, the rest RESOURCE_EXHAUSTED; a normal client on its own connection gets its first
    token (median of 3) within a bound of its own baseline and of the flood's step time."""
    limits = Limits(max_batch=8, max_queue=64)
    with serving(config(tmp_path, tok_base, max_batch=8, max_queue=64)) as server, stub_on_own_connection(server.address) as normal:
        alone = statistics.median(arrivals(normal, 2)[0] for _ in range(5))

        async def flood() -> tuple[list[tuple[grpc.StatusCode, str]], list[float], float]:
            async with grpc.aio.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
                stub = pb_grpc.AdapterFusionStub(channel)
                streams = [stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=300), timeout=RPC_TIMEOUT) for _ in range(100)]
                decoding = None
                for call in streams:  # the first one decoding (late ones are refused)
                    try:
                        first = await call.read()
                    except grpc.aio.AioRpcError:
                        continue
                    decoding = call
                    break
                assert decoding is not None and first.token_ids, "no flood call was served"
                times = [time.perf_counter()]
                for _ in range(10):
                    await decoding.read()
                    times.append(time.perf_counter())
                normal_first = statistics.median([(await asyncio.to_thread(arrivals, normal, 2))[0] for _ in range(3)])
                codes = []
                for call in streams:
                    call.cancel()
                    codes.append((await call.code(), await call.details()))
                return codes, gaps(times), normal_first

        codes, flood_gaps, beside = asyncio.run(flood())
        refused = [details for code, details in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        step = statistics.median(flood_gaps)
        bound = 4 * (alone + step)
        print(f"first token {alone * 1e3:.0f} ms alone, {beside * 1e3:.0f} ms beside a 100-call flood on one connection "
              f"(its step {step * 1e3:.0f} ms; bound {bound * 1e3:.0f} ms); {len(refused)} flood calls refused")
        assert len(refused) >= 100 - limits.tenant_queue - limits.tenant_rows
        assert set(refused) == {f"this connection already has {limits.tenant_queue} requests waiting, its share of the queue of 64; wait for some to finish, then retry"}
        assert beside <= bound, f"a normal client waited {beside:.2f} s for its first token beside a flood (bound {bound:.2f} s)"
        bump(FIGURES_KEY)
