"""Fault injection into the engine: a forward pass that raises (a pre-hook on the real model, set
from the test: our own code, nothing in the library changed), against a real server.

* one fault with 4 Generate streams open: every stream ends with INTERNAL and an error id within
  1 s; health (the Watch stream) goes NOT_SERVING and back to SERVING; a new Generate equals the
  greedy output from before the fault;
* a Score during a fault, and during the restart that follows, ends with an error, not a hang;
* faults that keep coming: after `max_faults` the engine is failed for good, health stays
  NOT_SERVING and new calls are UNAVAILABLE at once;
* `adapter-fusion serve` as a process exits 1 when its engine gives up (the fault injected in the
  subprocess by the test's launcher, see conftest.LAUNCHER);
* a client alone must not be able to fault the engine: a subnormal temperature did (fixed in d58709d).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc

from adapter_fusion.client import Client
from adapter_fusion.engines.builtin import Limits
from adapter_fusion.server.app import ServerConfig

from .conftest import (
    NOT_SERVING,
    PROMPT,
    RPC_TIMEOUT,
    SERVING,
    HealthWatch,
    ServeProcess,
    bump,
    code_of,
    collapse,
    greedy,
    health_status,
    load,
    score,
    serving,
    wait_health,
)

LONG_EXAMPLES = [("Tell me everything about " + "rivers and stones " * 20, "a long answer " * 4)] * 4


class Injector:
    """A forward pre-hook on the model that raises RuntimeError while armed (`remaining` times)."""

    def __init__(self, model) -> None:
        self.remaining = 0
        self.fired: list[float] = []
        self.lock = threading.Lock()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        with self.lock:
            if self.remaining <= 0:
                return
            self.remaining -= 1
            self.fired.append(time.monotonic())
        raise RuntimeError("injected fault (test)")

    def arm(self, times: float = 1) -> None:
        with self.lock:
            self.remaining = times

    def disarm(self) -> None:
        with self.lock:
            self.remaining = 0

    def close(self) -> None:
        self.handle.remove()


def _config(tmp_path: Path, base: Path, adapters: list[Path], **limits) -> ServerConfig:
    root = tmp_path / "adapters"
    for source in adapters[:2]:
        shutil.copytree(source, root / source.name)
    defaults = {"max_new_tokens": 512, "max_prompt_tokens": 512}
    return ServerConfig(
        base_dir=base, store_dir=tmp_path / "store", adapter_roots=[root], output_roots=[tmp_path / "out"], port=0, limits=Limits(**{**defaults, **limits})
    )


class Stream:
    """A Generate stream read to its end on its own thread; records how it ended and when."""

    def __init__(self, client: Client, adapter: str | None, tokens: int) -> None:
        self.call = client.generate(prompt=PROMPT, adapter=adapter, max_new_tokens=tokens, timeout=RPC_TIMEOUT)
        self.first = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended_at = 0.0
        self.messages = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.messages += 1
                self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def test_one_fault_ends_every_open_stream_then_the_engine_serves_again(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    config = _config(tmp_path, tok_base, tok_adapters, max_faults=10, restart_delay_s=0.5)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        load(client, "beta", "beta")
        before = {a: greedy(client, a, tokens=8) for a in ("alpha", "beta", None)}
        injector = Injector(server.running.engine.runtime.model)
        watch = HealthWatch(server.address)
        try:
            assert watch.wait_for(lambda s: SERVING in s, timeout=5)
            streams = [Stream(client, adapter, tokens=400) for adapter in ("alpha", "beta", None, "alpha")]
            for s in streams:
                assert s.first.wait(timeout=30) and s.code is None, "every stream is open and producing"
            with server.running.engine.hooks.awaited("fault") as faulted:
                injector.arm(1)
                assert faulted.wait(10), "the armed hook never faulted the engine"
            fault_at = injector.fired[0]
            for s in streams:
                s.thread.join(timeout=10)
            for s in streams:
                assert s.code == grpc.StatusCode.INTERNAL, (s.code, s.details)
                assert "error id" in s.details, s.details
                assert s.ended_at - fault_at <= 1.0, f"a stream ended {s.ended_at - fault_at:.2f} s after the fault"
            assert watch.wait_for(lambda s: collapse(s)[-3:] == [SERVING, NOT_SERVING, SERVING], timeout=10), collapse(watch.statuses)
            after = {a: greedy(client, a, tokens=8) for a in ("alpha", "beta", None)}
            assert after == before
            assert server.running.engine.stats["faults"] == 1 and server.running.engine.state == "serving"
            bump("faults_survived")
            bump("fault_streams_ended_internal", len(streams))
        finally:
            watch.close()
            injector.close()


def test_score_during_a_fault_and_its_restart_ends_with_an_error(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    config = _config(tmp_path, tok_base, tok_adapters, max_faults=10, restart_delay_s=2.0)  # a wide restart window
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        expected = score(client, LONG_EXAMPLES, adapter="alpha").log_likelihood
        injector = Injector(server.running.engine.runtime.model)
        try:
            injector.arm(1)
            start = time.monotonic()
            code, details = code_of(lambda: score(client, LONG_EXAMPLES, adapter="alpha", timeout=30))
            assert code == grpc.StatusCode.INTERNAL and "error id" in details, (code, details)
            assert time.monotonic() - start < 5
            assert health_status(server.address) == NOT_SERVING  # restarting
            start = time.monotonic()
            code, details = code_of(lambda: score(client, LONG_EXAMPLES, adapter="alpha", timeout=30))
            assert code == grpc.StatusCode.UNAVAILABLE and "restarting" in details, (code, details)
            assert time.monotonic() - start < 1
            code, _ = code_of(lambda: list(client.generate(prompt=PROMPT, max_new_tokens=2, timeout=30)))
            assert code == grpc.StatusCode.UNAVAILABLE
            wait_health(server.address, SERVING, timeout=10)
            assert list(score(client, LONG_EXAMPLES, adapter="alpha").log_likelihood) == list(expected)
            bump("faults_survived")
        finally:
            injector.close()


def test_faults_that_keep_coming_leave_the_engine_failed(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    config = _config(tmp_path, tok_base, tok_adapters, max_faults=3, fault_window_s=60, restart_delay_s=0.2)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        engine = server.running.engine
        injector = Injector(engine.runtime.model)
        watch = HealthWatch(server.address)
        try:
            assert watch.wait_for(lambda s: SERVING in s, timeout=5)
            injector.arm(float("inf"))
            codes = []
            with engine.hooks.awaited("fault", lambda error_id, gave_up: gave_up) as gave_up, engine.hooks.awaited("ended") as ended:
                for _ in range(10):  # bounded: 3 faults are enough
                    if engine.state == "failed":
                        break
                    wait_health(server.address, SERVING, timeout=10)
                    codes.append(code_of(lambda: list(client.generate(prompt=PROMPT, adapter="alpha", max_new_tokens=4, timeout=30)))[0])
                assert gave_up.wait(10), "the third fault did not make the engine give up"
                # it stays down: the engine thread has returned, so nothing can bring it back
                assert ended.wait(10), "the engine thread still runs after giving up"
            assert codes == [grpc.StatusCode.INTERNAL] * 3 and engine.state == "failed" and engine.stats["faults"] == 3
            assert server.running.failed.is_set()  # what makes `serve` exit non-zero
            # up, then down at each fault and up after each restart but the last: exactly this
            assert watch.wait_for(lambda s: len(collapse(s)) >= 6, timeout=10), collapse(watch.statuses)
            assert collapse(watch.statuses) == [SERVING, NOT_SERVING] * 3
            assert health_status(server.address) == NOT_SERVING
            assert health_status(server.address, "adapter_fusion.v1.AdapterFusion") == NOT_SERVING
            for call in (
                lambda: list(client.generate(prompt=PROMPT, max_new_tokens=2, timeout=10)),
                lambda: score(client, [("a", "b")], timeout=10),
            ):
                start = time.monotonic()
                code, details = code_of(call)
                assert code == grpc.StatusCode.UNAVAILABLE and "down after repeated faults" in details, (code, details)
                assert time.monotonic() - start < 2, "a call to a failed engine must be refused at once, not hang"
            bump("faults_until_failed", 3)
        finally:
            watch.close()
            injector.close()


def test_serve_exits_1_when_the_engine_gives_up(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], serve_processes: list[ServeProcess]) -> None:
    adapters = tmp_path / "adapters"
    shutil.copytree(tok_adapters[0], adapters / "alpha")
    trigger = tmp_path / "fault-now"
    args = [
        "serve", "--base", str(tok_base), "--store", str(tmp_path / "store"), "--adapter-root", str(adapters),
        "--output-root", str(tmp_path / "out"), "--preload", str(adapters / "alpha"), "--port", "0",
    ]
    process = ServeProcess(args, tmp_path / "serve.log", tmp_path, prewarm=True, env={"AF_FAULT_TRIGGER": str(trigger)})
    serve_processes.append(process)
    address = process.wait_serving()
    with Client(address) as client:
        assert greedy(client, "alpha", tokens=3)  # healthy before the fault
        trigger.write_text("on")
        codes = []
        deadline = time.monotonic() + 60
        while process.process.poll() is None and time.monotonic() < deadline:
            if health_status(address, timeout=1) == SERVING:
                code, details = code_of(lambda: list(client.generate(prompt=PROMPT, adapter="alpha", max_new_tokens=3, timeout=10)))
                codes.append(code)
                assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), (code, details)
                assert code != grpc.StatusCode.INTERNAL or "error id" in details
            time.sleep(0.05)
    assert process.process.wait(timeout=30) == 1, process.text()[-2000:]
    log = process.text()
    # the last request may see UNAVAILABLE: the process stops serving as soon as the engine gives up
    assert log.count("engine fault (error id") == 3 and len(codes) == 3 and "exiting with status 1" in log, (codes, log[-2000:])
    bump("serve_exit_on_failed_engine_checked")


def test_a_client_cannot_fault_the_engine_with_a_subnormal_temperature(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """temperature=1e-40 is in the accepted range [0, 100]; logits / 1e-40 overflow to inf and
    torch.multinomial raises on the engine thread: a fault that ends every stream in the batch.
    Three such requests within a minute leave the server failed for good (a one-client DoS)."""
    config = _config(tmp_path, tok_base, tok_adapters, restart_delay_s=0.2)  # default max_faults=3
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        codes = []
        for _ in range(3):
            wait_health(server.address, SERVING, timeout=10)
            codes.append(code_of(lambda: list(client.generate(prompt=PROMPT, adapter="alpha", temperature=1e-40, max_new_tokens=4, timeout=30))))
        assert server.running.engine.stats["faults"] == 0, f"{server.running.engine.stats['faults']} engine faults from a sampling setting; codes {codes}"
        assert health_status(server.address) == SERVING and server.running.engine.state == "serving"
        assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT) for code, _ in codes), codes
