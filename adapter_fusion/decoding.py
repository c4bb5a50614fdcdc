"""Continuous batching on a plain transformers model: requests join a running batch at step
boundaries (their prompts prefilled, their KV caches left-padded and joined to the batch's;
each step then writes its positions in place, `adapter_fusion.kv_cache`) and leave when they
finish (their rows dropped), each row routed to its own slot or
mix of slots; text is detokenized incrementally."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapter_fusion.kv_cache import GrowingCache, left_pad
from adapter_fusion.runtime import Runtime, padded
from adapter_fusion.slots import Route
from adapter_fusion.stop_strings import StopMatcher


@dataclass
class Request:
    """One generation: its prompt, route, sampling settings, and what it has produced."""

    prompt_ids: list[int]
    route: Route = 0  # its slot (0: the base model), or a mix of slots
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (stop strings trimmed)
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    cancelled: bool = False
    generator: torch.Generator | None = None
    decoded: tuple[int, int] = (0, 0)  # `detokenize`'s window: (prefix start, read end) in output_ids
    matcher: StopMatcher | None = field(default=None, repr=False)  # built on first use: after the limits are checked

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.seed)

    def stop_at(self) -> int | None:
        """Where a stop string starts in `text`, looking only at what was added since the last call."""
        if not self.stop:
            return None
        if self.matcher is None:
            self.matcher = StopMatcher(self.stop)
        return self.matcher.feed(self.text[self.matcher.seen :])

    @property
    def settled(self) -> int:
        """How much of `text` can no longer change: not a possible start of a stop, no broken UTF-8."""
        end = len(self.text.rstrip("\ufffd"))
        return end if self.matcher is None else min(end, len(self.text) - self.matcher.pending)


def _sample(logits: Tensor, request: Request) -> int:  # logits (vocab,)
    """One token drawn at the request's temperature, top-k and top-p; on the CPU, where the
    request's generator is."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("-inf"))
    top = logits.max()
    if not torch.isfinite(top):  # nothing finite to sample from: the best the model has
        return int(logits.argmax())
    logits = (logits - top) / request.temperature  # the best token at 0: no overflow at any temperature
    if request.top_k > 0:
        kth = torch.topk(logits, min(request.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=request.generator))


def detokenize(tokenizer, request: Request, final: bool = False) -> None:
    """Extend request.text by the text of its newest tokens without decoding the whole output
    each step: decode a short window (a few tokens before the new ones, for context such as a
    leading space) and keep what it adds; wait while the window ends in a broken UTF-8 sequence
    (vLLM's and TGI's incremental detokenizer). `final`: the output ends here, keep all of it."""
    ids, (prefix, read) = request.output_ids, request.decoded
    before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
    after = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        request.text += after[len(before) :]
        request.decoded = (read, len(ids))


class Decoder:
    """A running batch: admit requests at step boundaries; each step chooses one token per row
    (`choose()`, which a server streams at once) and runs the next forward (`advance()`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active: list[Request] = []
        # transformers 5.x renames forward's `past_key_values` to `cache` (the old name goes in 5.40)
        self._cache_keyword = "cache" if "cache" in inspect.signature(runtime.model.forward).parameters else "past_key_values"
        self._reset()

    def _reset(self) -> None:
        device = self.runtime.device
        self.cache = GrowingCache()  # per layer keys and values: (batch, heads, L, dim)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (batch, L), 0 on left padding
        self.logits = torch.zeros(0, 0, device=device)  # (batch, vocab): next-token logits per row

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, routes: list[Route], cache: GrowingCache) -> Tensor:
        """Next-token logits (batch, vocab) of each row's last position; the model extends `cache` in place."""
        with self.runtime.routed(routes):
            out = self.runtime.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{self._cache_keyword: cache}
            )  # only the last position's logits: the vocabulary projection is ~20% of a prefill
        return out.logits[:, -1]

    @torch.no_grad()
    def admit(self, requests: Sequence[Request]) -> None:
        """Prefill new requests together and join them to the running batch."""
        if not requests:
            return
        requests = sorted(requests, key=lambda r: repr(r.route))  # each slot's rows side by side: its prefill reads views, not gathers
        width = max(len(r.prompt_ids) for r in requests)
        ids, mask = padded([r.prompt_ids for r in requests], width, self.runtime.pad_id, left=True)
        ids, mask = ids.to(self.runtime.device), mask.to(self.runtime.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()
        logits = self._forward(ids, mask, positions, [r.route for r in requests], cache)
        if self.active:
            length = max(width, self.mask.shape[1])
            cache = self.cache.joined(cache, length)
            mask = torch.cat([left_pad(self.mask, length, 1), left_pad(mask, length, 1)])
            logits = torch.cat([self.logits, logits])
        self.active = self.active + list(requests)
        self.cache, self.mask, self.logits = cache, mask, logits

    def step(self) -> list[tuple[Request, int]]:
        """One token per active row, then the next forward; (request, token) for every row."""
        emitted = self.choose()
        self.advance()
        return emitted

    @torch.no_grad()
    def choose(self) -> list[tuple[Request, int]]:
        """Choose one token per active row from the last forward's logits and retire finished
        rows; `advance()` then runs the next forward (a server streams the tokens in between).

        Returns (request, token) for every row this step, finished ones included."""
        emitted: list[tuple[Request, int]] = []
        keep: list[int] = []
        tokenizer = self.runtime.tokenizer
        # greedy rows' tokens: one device sync per step, not one per row; the argmax in float32
        # (exact for any dtype), whose CPU kernel is 4x faster than bfloat16's
        best = self.logits.float().argmax(-1).tolist() if self.active else []
        for b, request in enumerate(self.active):
            if request.cancelled:
                request.finish_reason = "cancelled"
                continue
            token = best[b] if request.temperature <= 0 else _sample(self.logits[b].float().cpu(), request)
            emitted.append((request, token))
            if token in self.runtime.stop_ids:
                detokenize(tokenizer, request, final=True)
                request.finish_reason = "stop"
                continue
            request.output_ids.append(token)
            at_length = len(request.output_ids) >= request.max_new_tokens
            detokenize(tokenizer, request, final=at_length)
            hit = request.stop_at()  # only the new text: a step costs the same however many stops
            if hit is not None:
                request.text = request.text[:hit]
                request.finish_reason = "stop"
            elif at_length:
                request.finish_reason = "length"
            else:
                keep.append(b)
        if len(keep) < len(self.active):
            index = torch.tensor(keep, dtype=torch.long, device=self.runtime.device)
            self.cache = self.cache.select(index)
            self.mask = self.mask[index]
            self.logits = self.logits[index]  # the batch stays whole between choose and advance
            self.active = [self.active[b] for b in keep]
        return emitted

    @torch.no_grad()
    def advance(self) -> None:
        """The forward of the tokens `choose()` appended: next-token logits for every active row."""
        if self.active:
            ids = torch.tensor([[r.output_ids[-1]] for r in self.active], device=self.runtime.device)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
            positions = self.mask.sum(-1, keepdim=True) - 1
            self.logits = self._forward(ids, self.mask, positions, [r.route for r in self.active], self.cache)
        else:
            self._reset()


@torch.no_grad()
def greedy(runtime: Runtime, prompts: Sequence[list[int]], rows: Sequence[Route], max_new_tokens: int) -> list[list[int]]:
    """Batched greedy completion on `runtime` (stops at end-of-turn); a convenience over `Decoder`."""
    decoder = Decoder(runtime)
    requests = [Request(prompt_ids=list(p), route=s, max_new_tokens=max_new_tokens) for p, s in zip(prompts, rows)]
    decoder.admit(requests)
    while decoder.active:
        decoder.step()
    return [r.output_ids for r in requests]
