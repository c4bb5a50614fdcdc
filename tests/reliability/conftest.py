"""Shared parts of the reliability suite.

* `tok_base`: a tiny random Llama (2 layers, hidden 64) saved with SmolLM2's tokenizer, so a real
  server can tokenise, chat-template and decode with it; it loads in well under a second.
* `tok_adapters`: real peft adapters for it (random A and B, written by peft itself).
* `serving(config)`: an in-process server on 127.0.0.1:0 (`BackgroundServer`), always stopped.
* `ServeProcess`: `adapter-fusion serve` as a subprocess (for kill -9), optionally pre-warmed.
* `FIGURES`: what the suite tried (cases, kills, paths, faults), printed in the terminal summary
  and, when $RELIABILITY_FIGURES names a file, written there as JSON for bench/results.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import BackgroundServer, ServerConfig
from tests.conftest import write_peft_adapter

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPT = "Write a short story about rivers and stones."  # the greedy probe used everywhere
RPC_TIMEOUT = 60.0  # no call in this suite waits longer than this

FIGURES: dict[str, object] = {}


def bump(key: str, n: int = 1) -> None:
    FIGURES[key] = int(FIGURES.get(key, 0)) + n


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
    target = os.environ.get("RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2, sort_keys=True, default=str) + "\n")


# ---- models and adapters ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tok_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Llama with SmolLM2's tokenizer (49152 tokens, chat template)."""
    from adapter_fusion.models import default_base, tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tok-base") / "tiny-tok", tokenizer_from=default_base())


@pytest.fixture(scope="session")
def tok_adapters(tok_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four peft adapters on `tok_base`: different seeds, ranks and targets (strong deltas, so
    each one's greedy output differs from the base's and from the others')."""
    root = tmp_path_factory.mktemp("tok-adapters")
    return [
        write_peft_adapter(tok_base, root / "alpha", seed=11, r=4, alpha=8),
        write_peft_adapter(tok_base, root / "beta", seed=12, r=4, alpha=16),
        write_peft_adapter(tok_base, root / "gamma", seed=13, r=8, alpha=8, use_rslora=True),
        write_peft_adapter(tok_base, root / "delta", seed=14, r=4, alpha=4, targets=["q_proj", "v_proj"]),
    ]


# ---- in-process servers ---------------------------------------------------------------------


@contextmanager
def serving(config: ServerConfig) -> Iterator[BackgroundServer]:
    """A real server on its own loop thread (config.port should be 0); stopped however the test ends."""
    server = BackgroundServer(config)
    try:
        yield server
    finally:
        server.stop(grace=0.5)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with (OK if it succeeds), consuming a stream if it returns one."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)) and not hasattr(result, "ListFields"):
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int | None:
    """Health of `service` by one Check call; None if the server cannot be reached."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_health(address: str, want: int = SERVING, timeout: float = 30.0, service: str = "") -> float:
    """Poll until health is `want`; returns the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if health_status(address, service, timeout=1.0) == want:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"health of {address} did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(want)} within {timeout} s")


class HealthWatch:
    """Every status the health Watch stream sends, with the time it arrived (a thread reads it)."""

    def __init__(self, address: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(address)
        self.events: list[tuple[float, int]] = []
        self._stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for reply in self._stream:
                self.events.append((time.monotonic(), reply.status))
        except grpc.RpcError:
            pass

    @property
    def statuses(self) -> list[int]:
        return [s for _, s in self.events]

    def wait_for(self, condition: Callable[[list[int]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.statuses):
                return True
            time.sleep(0.01)
        return condition(self.statuses)

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5)
        self.channel.close()


def greedy(client: Client, adapter: str | None, tokens: int = 6, prompt: str = PROMPT, timeout: float = RPC_TIMEOUT) -> tuple[int, ...]:
    """The greedy token ids a server generates for `prompt` with `adapter`."""
    ids: list[int] = []
    for reply in client.generate(prompt=prompt, adapter=adapter, max_new_tokens=tokens, timeout=timeout):
        ids.extend(reply.token_ids)
    return tuple(ids)


def collapse(statuses: list[int]) -> list[int]:
    """A status sequence with repeats removed: [S, S, N, N, S] -> [S, N, S]."""
    out: list[int] = []
    for s in statuses:
        if not out or out[-1] != s:
            out.append(s)
    return out


# ---- `adapter-fusion serve` as a subprocess ---------------------------------------------------

# The CLI entry point with its imports done ahead, waiting for one line on stdin before it runs
# `adapter_fusion.cli.main()` (exactly what the `adapter-fusion` console script runs) with the
# given arguments. Importing torch/transformers/grpc takes ~6 s of CPU; a pre-warmed process lets
# the kill test start the next server while the current one is being killed. With
# $AF_FAULT_TRIGGER set, every forward pass of the model raises while that file exists: fault
# injection into our own engine, from the test side (no library code is changed).
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    import adapter_fusion.cli, adapter_fusion.server.app, adapter_fusion.runtime, transformers
    import transformers.models.llama.modeling_llama
    trigger = os.environ.get("AF_FAULT_TRIGGER")
    if trigger:
        from adapter_fusion import runtime as _runtime
        _init = _runtime.Runtime.__init__
        def _patched(self, *args, **kwargs):
            _init(self, *args, **kwargs)
            def _fault(module, inputs):
                if os.path.exists(trigger):
                    raise RuntimeError("injected fault (test)")
            self.model.register_forward_pre_hook(_fault)
        _runtime.Runtime.__init__ = _patched
    print("warm", flush=True)
    if not sys.stdin.readline():
        sys.exit(0)
    sys.argv = ["adapter-fusion", *sys.argv[1:]]
    adapter_fusion.cli.main()
    """
)
PORT_LINE = re.compile(r"adapter-fusion serving \S+ on 127\.0\.0\.1:(\d+)")


class ServeProcess:
    """One `adapter-fusion serve` process: its log in a file, its port parsed from the log
    (`--port 0`: the log line names the port actually bound)."""

    def __init__(self, args: list[str], log: Path, cwd: Path, prewarm: bool = False, env: dict[str, str] | None = None) -> None:
        self.log = log
        full_env = {**os.environ, "ADAPTER_FUSION_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        if prewarm:
            cmd = [sys.executable, "-c", LAUNCHER, *args]
        else:
            cmd = [sys.executable, "-m", "adapter_fusion.cli", *args]
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdin=subprocess.PIPE if prewarm else subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, text=True
        )
        self.prewarmed = prewarm
        self.started = not prewarm
        self.address: str | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_warm(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while "warm" not in self.text():
            if self.process.poll() is not None:
                raise AssertionError(f"the pre-warmed server process exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the pre-warmed server process did not finish its imports")
            time.sleep(0.02)

    def go(self) -> None:
        """Let a pre-warmed process run the serve command."""
        if not self.started:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            self.started = True

    def wait_serving(self, timeout: float = 120.0) -> str:
        """The address once the log names the port and health says SERVING; fails if the process dies."""
        self.go()
        deadline = time.monotonic() + timeout
        while self.address is None:
            match = PORT_LINE.search(self.text())
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                break
            if self.process.poll() is not None:
                raise AssertionError(f"adapter-fusion serve exited with {self.process.returncode} at startup:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"adapter-fusion serve did not start within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)
        wait_health(self.address, SERVING, timeout=max(1.0, deadline - time.monotonic()))
        return self.address

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log_file.close()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._log_file.close()
        return code


@pytest.fixture
def serve_processes() -> Iterator[list[ServeProcess]]:
    """Every ServeProcess a test appends here is killed at teardown if still running."""
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(timeout=30)
        if not proc._log_file.closed:
            proc._log_file.close()


# ---- calls with deadlines (the typed client's registry calls take none) -------------------------


def load(client: Client, name: str, path: str | Path, pin: bool = False, timeout: float = RPC_TIMEOUT):
    return client.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(path), pin=pin), timeout=timeout)


def unload(client: Client, name: str, timeout: float = RPC_TIMEOUT) -> None:
    client.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=timeout)


def listing(client: Client, timeout: float = RPC_TIMEOUT) -> dict[str, pb.AdapterInfo]:
    return {a.name: a for a in client.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout).adapters}


def compose(client: Client, name: str, recipe: pb.Recipe, timeout: float = RPC_TIMEOUT) -> pb.ComposeAdapterResponse:
    return client.stub.ComposeAdapter(pb.ComposeAdapterRequest(name=name, recipe=recipe), timeout=timeout)


def export(client: Client, name: str, path: str | Path, overwrite: bool = False, timeout: float = RPC_TIMEOUT) -> pb.ExportAdapterResponse:
    return client.stub.ExportAdapter(pb.ExportAdapterRequest(name=name, path=str(path), overwrite=overwrite), timeout=timeout)


def bake(client: Client, adapter: str, path: str | Path, overwrite: bool = False, timeout: float = RPC_TIMEOUT) -> list[pb.BakeModelProgress]:
    """Every progress message of a bake; the last one carries the manifest."""
    return list(client.stub.BakeModel(pb.BakeModelRequest(adapter=adapter, output_path=str(path), overwrite=overwrite), timeout=timeout))


def score(client: Client, examples: list[tuple[str, str]], adapter: str | None = None, raw: bool = False, timeout: float = RPC_TIMEOUT) -> pb.ScoreResponse:
    request = pb.ScoreRequest(adapter=adapter, raw=raw, examples=[pb.Example(input=i, target=t) for i, t in examples])
    return client.stub.Score(request, timeout=timeout)


# ---- many `adapter-fusion serve` processes, cheaply ------------------------------------------------

# A parent that imports the CLI and everything `serve` loads (~6 s of CPU), then forks one child
# per request line; each child is a separate process that runs `adapter_fusion.cli.main()` with
# the given arguments (exactly what the `adapter-fusion` console script runs), its stdout and
# stderr in the given log file. No torch op runs before the fork. Children are reaped by the
# kernel (SIGCHLD ignored in the parent), so a dead child's pid disappears.
ZYGOTE = textwrap.dedent(
    """
    import json, os, signal, sys
    import adapter_fusion.cli, adapter_fusion.server.app, adapter_fusion.runtime, transformers, grpc, peft
    import transformers.models.llama.modeling_llama
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("warm", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin = open(os.devnull)
            sys.argv = ["adapter-fusion", *spec["args"]]
            code = 0
            try:
                adapter_fusion.cli.main()
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    """
)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ForkedServe:
    """One `adapter-fusion serve` child of a Zygote."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid, self.log, self.address = pid, log, None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def wait_serving(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while self.address is None:
            match = PORT_LINE.search(self.text())
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                break
            if not self.alive():
                raise AssertionError(f"adapter-fusion serve (pid {self.pid}) exited at startup:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"adapter-fusion serve (pid {self.pid}) did not start within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)
        wait_health(self.address, SERVING, timeout=max(1.0, deadline - time.monotonic()))
        return self.address

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def wait_gone(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.alive()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.signal(signal.SIGKILL)
        assert self.wait_gone(30), f"pid {self.pid} survived SIGKILL"


class Zygote:
    def __init__(self, cwd: Path, log: Path) -> None:
        env = {**os.environ, "ADAPTER_FUSION_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._err = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        self.children: list[ForkedServe] = []
        self._warm = False

    def spawn(self, args: list[str], log: Path) -> ForkedServe:
        if not self._warm:
            line = self.process.stdout.readline()  # blocks until the imports are done (or the parent died)
            assert line.strip() == "warm", f"the zygote did not start: {line!r}"
            self._warm = True
        self.process.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line.strip().isdigit(), f"the zygote did not fork: {line!r}"
        child = ForkedServe(int(line), log)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.alive():
                os.kill(child.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._err.close()
