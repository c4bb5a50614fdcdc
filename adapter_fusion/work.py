"""What the engine holds for a caller: a generation streaming back through a callback, or a job
whose result is a future; each keeps its adapters held until it ends, exactly once. A job is a
list of pieces, each bounded in tokens (`token_chunks`), run one per round between decode steps."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
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
    mix_error: float = 0.0  # an engine that served a weighted mix truncated: its largest relative error


@dataclass(eq=False)
class Pending:
    """A generation: what it has streamed so far, so each event carries only what is new."""

    request: Request
    hold: Hold
    emit: Callable[[Event], None]  # called on the engine thread; it must not raise
    tenant: Hashable = None  # whose turn it takes in admission (a connection)
    sent_text: int = 0
    sent_ids: int = 0
    released: bool = False

    def stream(self) -> None:
        """Send the text that can no longer change (and its tokens), if any."""
        r = self.request
        end = r.settled
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


CANCELLED = "abandoned: the client cancelled or its deadline passed"  # what a job or request dropped for its caller is told

Piece = Callable[[object, "Job"], None]  # (route, job): one bounded part of a job's work


@dataclass(eq=False)
class Job:
    """Work run on the engine thread between decode steps: its pieces in order, one per round
    (so a stream waits at most one piece), then `result()` into the future. `cancelled` may be
    shared by every job of one call: cancelling it drops them all from the queue at once."""

    hold: Hold
    pieces: list[Piece]
    result: Callable[[], object]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tenant: Hashable = None
    future: Future = field(default_factory=Future)
    done: int = 0  # pieces run so far
    released: bool = False

    def fail(self, error: Exception) -> None:
        """Its future gets `error`, unless it already has an outcome (or its caller cancelled it)."""
        try:
            if not self.future.done():
                self.future.set_exception(error)
        except InvalidStateError:  # cancelled by its caller just now
            pass


def token_chunks(lengths: Sequence[int], budget: int, max_rows: int) -> list[slice]:
    """Consecutive runs of examples whose padded size (rows x the longest) stays within `budget`
    tokens and `max_rows` rows; an example longer than the budget is a run of its own."""
    chunks: list[slice] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and (wider * (i - start + 1) > budget or i - start >= max_rows):
            chunks.append(slice(start, i))
            start, wider = i, n
        longest = wider
    if start < len(lengths):
        chunks.append(slice(start, len(lengths)))
    return chunks
