"""Client deadlines that pass while the engine computes must not harm it: the abandoned work
stops at its next chunk or step, and afterwards Generate and Score give what they gave before."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc

from adapter_fusion.client import Client
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.server.app import ServerConfig

from .conftest import PROMPT, SERVING, bump, code_of, greedy, health_status, load, score, serving

# 24 examples of ~1400 prompt tokens, scored in 24 pieces of one row (over the 512-token budget
# per piece), after ~0.1 s of tokenising: a deadline can pass while the engine computes
LONG = [("hello world " * 700, "the end")] * 24
SHORT = [("Rewrite in capitals: stone cloud", "STONE CLOUD"), ("Say hi.", "hi")]


class BusyMonitor:
    """When the engine was busy (polled every 5 ms on a thread)."""

    def __init__(self, engine) -> None:
        self.engine, self.times, self.stopped = engine, [], False
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped and time.monotonic() - self.start < 30:
            if self.engine.busy:
                self.times.append(time.monotonic() - self.start)
            time.sleep(0.005)

    def stop(self) -> tuple[float, float]:
        self.stopped = True
        self.thread.join(timeout=5)
        return (self.times[0], self.times[-1]) if self.times else (0.0, 0.0)


def _settle(engine, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while engine.busy and time.monotonic() - start < timeout:
        time.sleep(0.02)
    return time.monotonic() - start


def test_deadlines_passing_mid_computation_leave_the_engine_healthy(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    shutil.copytree(tok_adapters[0], tmp_path / "adapters" / "alpha")
    config = ServerConfig(
        base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[tmp_path / "adapters"], output_roots=[tmp_path / "out"], port=0,
        limits=Limits(max_prompt_tokens=2048, max_new_tokens=512, max_batch=4),
    )
    with serving(config) as server, Client(server.address) as client:
        engine = server.running.engine
        load(client, "alpha", "alpha")
        before_generate = {a: greedy(client, a, tokens=8) for a in ("alpha", None)}
        before_score = list(score(client, SHORT, adapter="alpha").log_likelihood)

        deadlines = {}
        for adapter in ("alpha", None):  # a Score whose deadline passes while its pieces run
            score(client, LONG[:1], adapter=adapter, raw=True)  # warm: a first piece of this shape is slower
            monitor = BusyMonitor(engine)
            score(client, LONG, adapter=adapter, raw=True)  # the whole computation with this adapter, for reference
            first, last = monitor.stop()
            full = last - first
            # the deadline passes 40% into this machine's own computation of the same Score (a fixed
            # 0.3 s once landed at 75% of a fast run; one row per piece, the base model's Score is much
            # faster than alpha's); stopping within one of its 24 pieces stays well under 75%
            deadline = deadlines[adapter] = first + 0.4 * full
            for _ in range(3):  # on a loaded machine tokenising may outlast the deadline: try again (bounded)
                monitor = BusyMonitor(engine)
                code, _ = code_of(lambda: score(client, LONG, adapter=adapter, raw=True, timeout=deadline))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                _settle(engine)
                first, last = monitor.stop()
                assert not engine.busy, "the abandoned Score still occupies the engine"
                if monitor.times and first < deadline:
                    break
            assert monitor.times and first < deadline, f"the engine never computed before the deadline (busy from {first:.2f} s)"
            assert last - first < 0.75 * full, f"the abandoned Score ran {last - first:.2f} s of a {full:.2f} s computation"
            bump("deadline_cases")
            print(f"Score with a {deadline:.2f} s deadline: engine busy {first:.2f}..{last:.2f} s (whole Score: {full:.2f} s of compute)")

        stream = client.generate(prompt=PROMPT, adapter="alpha", max_new_tokens=400, timeout=0.5)  # a Generate cut mid-stream
        code, _ = code_of(lambda: stream)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        _settle(engine)
        assert not engine.busy and engine.decoder.active == []
        bump("deadline_cases")

        # a deadline that passes while other requests share the batch: the others are untouched
        long_stream = client.generate(prompt=PROMPT, adapter="alpha", max_new_tokens=40, timeout=60)
        code, _ = code_of(lambda: score(client, LONG, adapter="alpha", raw=True, timeout=deadlines["alpha"]))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        ids = tuple(i for reply in long_stream for i in reply.token_ids)
        assert ids[:8] == before_generate["alpha"]
        bump("deadline_cases")

        assert health_status(server.address) == SERVING and engine.state == "serving" and engine.stats["faults"] == 0
        assert {a: greedy(client, a, tokens=8) for a in ("alpha", None)} == before_generate
        assert list(score(client, SHORT, adapter="alpha").log_likelihood) == before_score
