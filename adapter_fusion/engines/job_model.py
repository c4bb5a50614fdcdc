"""Work that needs a differentiable transformers model (learned coefficients) beside an engine
that has none to lend (vLLM): a private copy of the base loaded on first use, one job at a time
on its own thread, each with its adapter written into slot 1."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adapter_fusion.errors import RequestCancelledError
from adapter_fusion.runtime import Runtime
from adapter_fusion.work import Job


class JobModel:
    def __init__(self, base_dir: Path, device: str | None) -> None:
        self.base_dir, self.device = base_dir, device
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-model")

    def runtime(self) -> Runtime:
        with self._lock:  # a search asks from a worker thread, its pieces from the job thread
            if self._runtime is None:
                self._runtime = Runtime(self.base_dir, device=self.device, slot_columns=8)
            return self._runtime

    def run(self, job: Job, work: Callable[[object, Job], object], done: Callable[[Job], None], cancelled_message: str) -> None:
        """Run `work(route, job)` with the job's adapter in slot 1; its outcome into `job.future`, then `done(job)`."""

        def execute() -> None:
            try:
                if not job.future.set_running_or_notify_cancel():
                    return
                try:
                    if job.cancelled.is_set():
                        raise RequestCancelledError(cancelled_message)
                    self.runtime().set_slots([job.hold.entries[0].sources] if job.hold.entries else [])
                    job.future.set_result(work(1 if job.hold.entries else 0, job))
                except BaseException as error:  # its caller sees it: the engine goes on
                    job.fail(error)
            finally:
                done(job)

        self._thread.submit(execute)

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
