"""The health Watch stream must not cost the server anything once the watcher is gone.

Found by this suite (fixed in fd4c42f): server/app.py served grpc_health's synchronous
`HealthServicer` on a grpc.aio server. Each Watch then ran its blocking generator in the event
loop's default executor (min(32, cores + 4) threads: 6 on 2 cores) and was never closed, neither
when the client cancelled nor when the server stopped. So six Watch streams, even ones cancelled
long ago, occupied every worker thread: every RPC that does work in a thread (LoadAdapter,
ComposeAdapter, Generate's tokenising, Score, ExportAdapter, BakeModel) hung until its deadline,
and `adapter-fusion serve` never exited on SIGTERM after a single Watch.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_fusion.client import Client
from adapter_fusion.server.app import ServerConfig

from .conftest import PROMPT, SERVING, ServeProcess, bump, code_of, greedy, load, serving


def _watch_and_cancel(address: str) -> grpc.StatusCode:
    """Open a Watch, read its first status (if it comes within 5 s), cancel it."""
    with grpc.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        try:
            assert next(stream).status == SERVING
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()
        finally:
            stream.cancel()


async def _default_executor_answers() -> str:
    """The server's RPCs now run their blocking work on `adapter_fusion.worker_threads`, so the
    loop's default executor is checked directly: it is where a synchronous servicer's Watch runs."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: "free")


def test_health_watch_streams_do_not_pin_worker_threads(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    shutil.copytree(tok_adapters[0], tmp_path / "adapters" / "alpha")
    config = ServerConfig(base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[tmp_path / "adapters"], output_roots=[tmp_path / "out"], port=0)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        n = min(32, (os.cpu_count() or 1) + 4)  # the event loop's default executor's size
        watches = []
        for _ in range(n):  # one after another: each is cancelled before the next opens
            watches.append(_watch_and_cancel(server.address).name)
            time.sleep(0.05)
        bump("health_watch_streams_opened_and_cancelled", n)
        free = asyncio.run_coroutine_threadsafe(_default_executor_answers(), server.loop)  # what the Watch streams pinned
        assert free.result(timeout=10) == "free"
        load_code, load_details = code_of(lambda: load(client, "beta", "alpha", timeout=10))
        generate_code, generate_details = code_of(lambda: greedy(client, "alpha", tokens=2, timeout=10))
        assert (load_code, generate_code) == (grpc.StatusCode.OK, grpc.StatusCode.OK), (
            f"after {n} health Watch streams, each cancelled at once: LoadAdapter {load_code.name} {load_details}; "
            f"Generate {generate_code.name} {generate_details}; the Watch calls themselves: {watches}"
        )


def test_serve_exits_on_sigterm_after_a_health_watch(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], serve_processes: list[ServeProcess]) -> None:
    shutil.copytree(tok_adapters[0], tmp_path / "adapters" / "alpha")
    args = [
        "serve", "--base", str(tok_base), "--store", str(tmp_path / "store"), "--adapter-root", str(tmp_path / "adapters"),
        "--output-root", str(tmp_path / "out"), "--preload", str(tmp_path / "adapters" / "alpha"), "--port", "0", "--grace", "1",
    ]
    process = ServeProcess(args, tmp_path / "serve.log", tmp_path, prewarm=True)
    serve_processes.append(process)
    address = process.wait_serving()
    _watch_and_cancel(address)
    with Client(address) as client:
        assert greedy(client, "alpha", tokens=2, prompt=PROMPT)
    process.process.send_signal(15)
    try:
        code = process.process.wait(timeout=30)
    except Exception:
        code = None
    assert code == 0, f"adapter-fusion serve did not exit within 30 s of SIGTERM after one health Watch:\n{process.text()[-1500:]}"
