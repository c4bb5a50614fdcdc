"""Generate and Score: every request's work is bounded before it starts (bytes before tokenising,
tokens after, examples) and abandoned when its client cancels or its deadline passes. Mixed into `server.service.AdapterFusionService`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from adapter_fusion.engine import Event
from adapter_fusion.errors import InvalidRequestError, LimitExceededError
from adapter_fusion.decoding import Request
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.worker_threads import in_thread
from server.calls import thread_safe_emit

if TYPE_CHECKING:
    from server.service import AdapterFusionService

ROLES = ("system", "user", "assistant")
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


class InferenceRPCs:
    """The model-facing RPCs; `self` is the AdapterFusionService."""

    # ---- inputs --------------------------------------------------------------------------------

    def _text(self: AdapterFusionService, text: str, what: str) -> str:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_text_bytes:
            raise LimitExceededError(f"{what} is {size} bytes; the limit is {self.limits.max_text_bytes} (before tokenising)")
        return text

    def _capped(self: AdapterFusionService, ids: list[int], what: str, limit: int) -> list[int]:
        if not ids:
            raise InvalidRequestError(f"{what} is empty after tokenising")
        if len(ids) > limit:
            raise LimitExceededError(f"{what} has {len(ids)} tokens; the limit is {limit}")
        return ids

    def _prompt_ids(self: AdapterFusionService, request: pb.GenerateRequest) -> list[int]:
        encoder, limit = self.model.encoder, self.model.limits.max_prompt_tokens
        which = request.WhichOneof("input")
        if which == "prompt" and request.prompt.strip():
            return self._capped(encoder.text_ids(self._text(request.prompt, "the prompt")), "the prompt", limit)
        if which == "messages" and request.messages.messages:
            messages = [{"role": m.role or "user", "content": self._text(m.content, "a message")} for m in request.messages.messages]
            if any(m["role"] not in ROLES for m in messages):
                raise InvalidRequestError("message roles must be system, user or assistant")
            self._text("".join(m["content"] for m in messages), "the messages together")
            return self._capped(encoder.chat_ids(messages), "the prompt", limit)
        raise InvalidRequestError("the prompt is empty: set `prompt` or `messages`")

    def _example_ids(self: AdapterFusionService, examples, raw: bool, where: str = "", fit: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each example's input and target, every limit checked; `where` names the
        set in errors (a recipe has several). For a `fit`, targets are as fits learn them
        (`Encoder.answer_ids`); Score reads them as given."""
        at = f"{where}: " if where else ""
        if not examples:
            raise InvalidRequestError(f"{at}at least one example is needed")
        if len(examples) > self.limits.max_examples:
            raise LimitExceededError(f"{at}{len(examples)} examples; the limit is {self.limits.max_examples}")
        encoder, limits = self.model.encoder, self.model.limits
        prompts, targets = [], []
        for i, ex in enumerate(examples):
            if not ex.input.strip() or not ex.target:
                raise InvalidRequestError(f"{at}example {i} needs a non-empty input and target")
            text, target = self._text(ex.input, f"{at}example {i}'s input"), self._text(ex.target, f"{at}example {i}'s target")
            prompts.append(self._capped(encoder.text_ids(text) if raw else encoder.chat_ids(text), f"{at}example {i}'s input", limits.max_prompt_tokens))
            target_ids = encoder.answer_ids(target, not raw) if fit else encoder.text_ids(target)
            targets.append(self._capped(target_ids, f"{at}example {i}'s target", limits.max_target_tokens))
        return prompts, targets

    # ---- generation and scoring ----------------------------------------------------------------

    async def Generate(self: AdapterFusionService, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self.calls.streaming("Generate", context, self._generate(request, context)):  # grpc.aio wants an async generator here
            yield message

    async def _generate(self: AdapterFusionService, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle: Request | None = None
        try:
            self.model.limits.check_stops(request.stop)  # by count first: before any copy or tokenising
            self.engine.check_room(tenant_of(context))  # a full queue or share refused before tokenising too
            prompt_ids = await in_thread(self._prompt_ids, request)
            target = await self._target(request)
            handle = Request(
                prompt_ids=prompt_ids,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p or 1.0,
                top_k=request.top_k,
                seed=request.seed,
                stop=list(request.stop),
            )
            self.engine.submit(handle, target, thread_safe_emit(asyncio.get_running_loop(), events), tenant_of(context))
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

    async def Score(self: AdapterFusionService, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async def work() -> pb.ScoreResponse:
            prompts, targets = await in_thread(self._example_ids, request.examples, request.raw)
            job = self.engine.score(await self._target(request), prompts, targets, tenant=tenant_of(context))
            try:
                nll = await asyncio.wrap_future(job.future)
            finally:
                self.engine.cancel(job.cancelled)  # a client gone or a deadline passed: out of the queue now
            counts = [len(t) for t in targets]
            return pb.ScoreResponse(log_likelihood=[-float(x) for x in nll], target_tokens=counts, mean_loss=float(nll.sum()) / sum(counts))

        return await self.calls.unary("Score", context, work)
