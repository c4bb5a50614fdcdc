"""Generate and Score: every request's work is bounded before it starts (bytes before tokenising,
tokens after, examples: `adapter_fusion.server.inputs`) and abandoned when its client cancels or its deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from adapter_fusion.decoding import Request
from adapter_fusion.engines.base import ServingEngine
from adapter_fusion.entries import Hold
from adapter_fusion.registry import AdapterRegistry
from adapter_fusion.work import Event
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from adapter_fusion.server.calls import Calls, thread_safe_emit
from adapter_fusion.server.compose import Compositions
from adapter_fusion.server.inputs import Inputs

MIX_ERROR_KEY = "adapter-fusion-mix-relative-error"  # trailing metadata: how far a truncated mix is from the exact sum


def tenant_of(context) -> str | None:
    """Whose turn a call takes in the engine: its connection (gRPC's peer address and port);
    None where the context has no peer (a call forwarded inside a cluster replica)."""
    peer = getattr(context, "peer", None)
    return peer() if callable(peer) else None


def when_done(context, callback: Callable[[], None]) -> None:
    """Call `callback` when the RPC ends however it ends. A cancelled stream's handler is left
    suspended at a `yield` (its `finally` runs only when the generator is collected), so
    engine work is released here, at once."""
    add = getattr(context, "add_done_callback", None)
    if callable(add):
        add(lambda _: callback())


class Inference:
    """Generate and Score on the engine, their targets from the compositions, held until they end."""

    def __init__(self, *, engine: ServingEngine, registry: AdapterRegistry, inputs: Inputs, compositions: Compositions, calls: Calls) -> None:
        self.engine, self.registry, self.inputs, self.compositions, self.calls = engine, registry, inputs, compositions, calls

    def _handed(self, hold: Hold, hand: Callable[[Hold], object]):
        """Give the engine a hold: it owns it once `hand` returns; if `hand` refuses, it is let go here."""
        try:
            return hand(hold)
        except BaseException:
            self.registry.release(hold)
            raise

    async def generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle: Request | None = None
        try:
            self.inputs.model.limits.check_stops(request.stop)  # by count first: before any copy or tokenising
            self.engine.check_room(tenant_of(context))  # a full queue or share refused before tokenising too
            prompt_ids = await in_thread(self.inputs.prompt_ids, request)
            hold = await self.compositions.target(request)
            handle = Request(
                prompt_ids=prompt_ids,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p or 1.0,
                top_k=request.top_k,
                seed=request.seed,
                stop=list(request.stop),
            )
            emit = thread_safe_emit(asyncio.get_running_loop(), events)
            self._handed(hold, lambda held: self.engine.submit(handle, held, emit, tenant_of(context)))
            when_done(context, lambda: self.engine.cancel_request(handle))
            first = True
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                if first and (event.text or event.token_ids):
                    self.calls.observer.first_token(time.perf_counter() - start)
                    first = False
                if event.finish_reason is None:
                    yield pb.GenerateResponse(text=event.text, token_ids=event.token_ids)
                    continue
                if event.mix_error and callable(getattr(context, "set_trailing_metadata", None)):
                    context.set_trailing_metadata(((MIX_ERROR_KEY, f"{event.mix_error:.6g}"),))  # a mix truncated to the engine's rank
                if event.finish_reason != "cancelled":
                    usage = pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
                    yield pb.GenerateResponse(text=event.text, token_ids=event.token_ids, finish_reason=event.finish_reason, usage=usage)
                return
        finally:
            if handle is not None:  # a client gone or a deadline passed: out of the queue now, or out of its row at the next step
                self.engine.cancel_request(handle)

    async def score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        prompts, targets = await in_thread(self.inputs.example_ids, request.examples, request.raw)
        hold = await self.compositions.target(request)
        job = self._handed(hold, lambda held: self.engine.score(held, prompts, targets, tenant=tenant_of(context)))
        try:
            nll = await asyncio.wrap_future(job.future)
        finally:
            self.engine.cancel(job.cancelled)  # a client gone or a deadline passed: out of the queue now
        counts = [len(t) for t in targets]
        return pb.ScoreResponse(log_likelihood=[-float(x) for x in nll], target_tokens=counts, mean_loss=float(nll.sum()) / sum(counts))
