"""The life of an engine whose model one thread owns: its state ("starting", "serving",
"restarting", "failed", "stopped") under the engine's wake condition, told to the server through
`on_state` (health follows it), the check every request passes, and the thread's start and halt."""

from __future__ import annotations

import threading
from collections.abc import Callable

from adapter_fusion.errors import ShuttingDownError, UnavailableError


class Lifecycle:
    def __init__(self, wake: threading.Condition, run: Callable[[], None], name: str, on_state: Callable[[str], None] | None, failed: str) -> None:
        self.wake = wake
        self.reasons = {"restarting": "restarting after a fault", "failed": failed}  # what a refused request is told
        self.on_state = on_state or (lambda state: None)
        self.state = "starting"
        self.thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> None:
        self.set("serving")
        self.thread.start()

    def set(self, state: str) -> None:
        """A new state, unless the engine was stopped (nothing comes back from that)."""
        with self.wake:
            if self.state == "stopped" and state != "stopped":
                return
            self.state = state
        self.on_state(state)

    def check_open(self) -> None:  # wake held
        if self.state != "serving":
            reason = self.reasons.get(self.state, self.state)
            raise (ShuttingDownError if self.state == "stopped" else UnavailableError)(
                f"the serving engine is {reason}; retry shortly or on another replica"
            )

    def halt(self) -> bool:
        """Stopped (a failed engine stays failed), the thread woken and joined; whether it ended."""
        with self.wake:
            if self.state != "failed":
                self.state = "stopped"
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        return not self.thread.is_alive()
