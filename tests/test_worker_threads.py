"""Work off the event loop runs in threads that end with it (`adapter_fusion.worker_threads`)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest

from adapter_fusion.worker_threads import WORKERS, ShortLivedThreads, in_thread
from tests.conftest import wait_threads_ended


def test_results_errors_and_the_thread_cap() -> None:
    pool = ShortLivedThreads(max_workers=2, name="test-short-lived")
    running, most, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        if i == 3:
            raise ValueError("call 3 fails")
        return i * i

    futures = [pool.submit(work, i) for i in range(6)]
    assert [f.result(timeout=10) for i, f in enumerate(futures) if i != 3] == [0, 1, 4, 16, 25]
    with pytest.raises(ValueError, match="call 3 fails"):
        futures[3].result()
    assert most == 2  # queued calls wait for one of the two threads
    wait_threads_ended("test-short-lived")  # and both end once the queue is empty
    assert pool.submit(lambda: "again").result(timeout=10) == "again"  # a new thread for new work
    pool.shutdown()


def test_shutdown_cancels_what_waits_and_refuses_new_work() -> None:
    pool = ShortLivedThreads(max_workers=1, name="test-shutdown")
    started, gate = threading.Event(), threading.Event()
    first = pool.submit(lambda: started.set() or gate.wait(10))
    started.wait(10)
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    assert first.result(timeout=10) is True  # the running call finishes
    with pytest.raises(CancelledError):
        queued.result(timeout=10)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)
    pool.shutdown(wait=True)
    assert not [t for t in threading.enumerate() if t.name == "test-shutdown"]


def test_a_thread_that_cannot_start_fails_its_submit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ShortLivedThreads(max_workers=1, name="test-start")
    ran = []

    def refuse(self) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.submit(ran.append, "refused")
    assert pool.submit(lambda: "next").result(timeout=10) == "next"  # no phantom thread holds the one place
    wait_threads_ended("test-start")
    assert ran == []  # the refused call never runs later
    pool.shutdown()


def test_in_thread_carries_the_callers_context() -> None:
    request_id = contextvars.ContextVar("request_id")

    async def main() -> tuple[str, str]:
        request_id.set("r-17")
        return await in_thread(lambda: (request_id.get(), threading.current_thread().name))

    assert asyncio.run(main()) == ("r-17", WORKERS.name)


CHECK = """
import os, time, torch
from adapter_fusion.worker_threads import WORKERS
torch.set_num_threads(2)  # a team of two whatever OMP_NUM_THREADS says
torch.ones(512, 512) @ torch.ones(512, 512)  # this thread's own team exists before counting
before = len(os.listdir("/proc/self/task"))
def parallel_work():
    x = torch.ones(2048, 2048)
    torch.linalg.qr(x @ x)  # parallel regions: this thread gets OpenMP helpers
    return len(os.listdir("/proc/self/task"))
during = WORKERS.submit(parallel_work).result()
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > before and time.monotonic() < deadline:
    time.sleep(0.01)
print(before, during, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="counts a process's OS threads (Linux), needs 2 cores")
def test_a_torch_threads_helpers_end_with_it() -> None:
    """The reason for the module: a thread that ran a parallel torch op holds OpenMP helper
    threads while it lives; once the worker ends, the process has its earlier thread count.
    In a fresh interpreter, where no other library's threads come and go."""
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=True).stdout
    before, during, after = map(int, out.split())
    assert during > before + 1  # the worker and its helpers
    assert after == before
