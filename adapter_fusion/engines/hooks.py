"""Phases of the engine thread that a caller can await instead of sleeping.

The scheduler and the engine call `fire(phase, ...)` at each point below; whoever wants to know
(a test: "the first token is out, unload now"; a probe: "the engine gave up") adds a listener.
With no listener a phase costs one dict lookup. A listener runs on the engine thread, in the
middle of a round: it must not raise (that would be an engine fault) and should return quickly;
a test may block in one on purpose, to hold the engine at that point while it acts.

Phases and their arguments:
  admitted     (requests)       requests joined the batch (their slots ready), before their prefill
  forward      (kind)           a forward of the batch is about to run: "prefill" or "decode" ("step" on vLLM)
  emitted      (emitted)        one step's tokens ([(request, token)]) were handed to every stream
  slot_written (slot, sources)  a slot's buffers were written (sources empty: the slot was freed)
  fault        (error_id, gave_up)  a fault ended what the engine held; gave_up: no restart follows
  ended        ()               the engine thread returned (stopped or failed): no phase follows
  preparing    (request)        the vLLM engine is about to prepare a request's LoRA (on a preparing
                                thread, not the engine thread; the builtin engine has no such phase)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PHASES = ("admitted", "forward", "emitted", "slot_written", "fault", "ended", "preparing")

Listener = Callable[..., None]


class EngineHooks:
    def __init__(self) -> None:
        self._listeners: dict[str, tuple[Listener, ...]] = {}  # replaced, never mutated: fire needs no lock
        self._lock = threading.Lock()

    def fire(self, phase: str, *args: object) -> None:
        listeners = self._listeners.get(phase)
        if listeners:
            for listener in listeners:
                listener(*args)

    def add(self, phase: str, listener: Listener) -> None:
        if phase not in PHASES:
            raise ValueError(f"no engine phase {phase!r}; phases: {', '.join(PHASES)}")
        with self._lock:
            self._listeners[phase] = (*self._listeners.get(phase, ()), listener)

    def remove(self, phase: str, listener: Listener) -> None:
        with self._lock:
            rest = tuple(other for other in self._listeners.get(phase, ()) if other is not listener)
            if rest:
                self._listeners[phase] = rest
            else:
                self._listeners.pop(phase, None)

    @contextmanager
    def listening(self, phase: str, listener: Listener) -> Iterator[None]:
        """`listener` hears `phase` inside the block only."""
        self.add(phase, listener)
        try:
            yield
        finally:
            self.remove(phase, listener)

    @contextmanager
    def awaited(self, phase: str, when: Callable[..., bool] = lambda *args: True) -> Iterator[threading.Event]:
        """An event set the first time `phase` fires with arguments for which `when` holds
        (inside the block; `when` runs on the engine thread)."""
        seen = threading.Event()

        def listener(*args: object) -> None:
            if not seen.is_set() and when(*args):
                seen.set()

        with self.listening(phase, listener):
            yield seen
