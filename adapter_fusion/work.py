"""What the engine holds for a caller: a generation streaming back through a callback, or a job
whose result is a future; each keeps its adapters held until it ends, exactly once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from adapter_fusion.entries import Hold
from adapter_fusion.decoding import Request


@dataclass(frozen=True)
class Event:
    """What a request's callback receives: new text/tokens, and on the last event the end."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


def holdback(text: str, stops: list[str]) -> int:
    """How much of `text` is safe to stream: not a possible start of a stop string, no broken UTF-8."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


@dataclass(eq=False)
class Pending:
    """A generation: what it has streamed so far, so each event carries only what is new."""

    request: Request
    hold: Hold
    emit: Callable[[Event], None]  # called on the engine thread; it must not raise
    sent_text: int = 0
    sent_ids: int = 0
    released: bool = False

    def stream(self) -> None:
        """Send the text that can no longer change (and its tokens), if any."""
        r = self.request
        end = holdback(r.text, r.stop)
        if end > self.sent_text:
            self.emit(Event(r.text[self.sent_text : end], tuple(r.output_ids[self.sent_ids :])))
            self.sent_text, self.sent_ids = end, len(r.output_ids)

    def finished(self) -> Event:
        """The last event of a request that ended on its own: the rest of its text, and counts."""
        r = self.request
        if r.finish_reason == "cancelled":
            return Event(finish_reason="cancelled")
        text, ids = r.text[self.sent_text :], tuple(r.output_ids[self.sent_ids :])
        return Event(text, ids, r.finish_reason, len(r.prompt_ids), len(r.output_ids))


@dataclass(eq=False)
class Job:
    """Work run on the engine thread between decode steps (scoring): (route, job) -> result."""

    hold: Hold
    work: Callable[[object, Job], object]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False
