"""Generations on the vLLM engine: what each holds while in flight, how many one tenant may have
in flight (the builtin engine's queue and batch shares, as one count), and vLLM's streamed deltas
as our events."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from adapter_fusion.decoding import Request
from adapter_fusion.engines.vllm_loras import Lora
from adapter_fusion.entries import Hold
from adapter_fusion.errors import LimitExceededError
from adapter_fusion.limits import Limits
from adapter_fusion.work import Event


@dataclass(eq=False)
class Live:
    """A generation in flight: its request, what it holds, its LoRA, the tokens it has produced."""

    request: Request
    hold: Hold
    emit: Callable[[Event], None]
    tenant: Hashable
    lora: Lora | None = None
    completion: int = 0
    ended: bool = False


class InFlight:
    """Generations submitted and not ended, in all and per tenant; the caller holds its lock."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total, self.share = limits.max_queue + limits.max_batch, limits.tenant_queue + limits.tenant_rows
        self._count: Counter = Counter()  # per tenant; None: all

    def check(self, tenant: Hashable) -> None:
        if self._count[None] >= self.total:
            raise LimitExceededError(f"the engine is full ({self.total} requests in flight); retry later")
        if tenant is not None and self._count[tenant] >= self.share:
            raise LimitExceededError(
                f"this connection already has {self.share} requests in flight, its share of the queue of {self.limits.max_queue} "
                f"and the batch of {self.limits.max_batch}; wait for some to finish, then retry"
            )

    def add(self, tenant: Hashable, sign: int = 1) -> None:
        for key in [None, tenant] if tenant is not None else [None]:
            self._count[key] += sign

    def __len__(self) -> int:
        return self._count[None]


def event_of(live: Live, output, stop_ids: set[int]) -> Event | None:
    """vLLM's delta for one generation as our event (None: nothing new); its stop token is not
    output, as the builtin engine's is not. Counts the tokens into `live.completion`."""
    done = output.outputs[0]
    ids = tuple(done.token_ids)
    if output.finished and done.finish_reason == "stop" and ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    live.completion += len(ids)
    if not output.finished:
        return Event(done.text, ids) if done.text or ids else None
    if done.finish_reason == "abort":
        return Event(finish_reason="cancelled")
    error = live.lora.relative_error if live.lora is not None else 0.0
    return Event(done.text, ids, done.finish_reason, len(live.request.prompt_ids), live.completion, mix_error=error)
