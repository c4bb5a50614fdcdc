"""The one protocol the gRPC server talks to an engine through: generate (a stream of token
events, cancellable), score, run a job on a model with an adapter in place, admission checks,
health, stop. What a request means (its tokens, its adapter, its limits) is decided above the
engine, so every engine gives the same answers to the same call.

Adapters are named and held through the registry (`adapter_fusion.registry`) the engine was built
with; an engine makes a held adapter resident in its own way (the builtin engine's slots, vLLM's
LoRA ids) and drops it when the registry frees it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Protocol

import torch

from adapter_fusion.decoding import Request
from adapter_fusion.entries import Choice, Hold
from adapter_fusion.errors import InvalidRequestError
from adapter_fusion.runtime import Runtime
from adapter_fusion.work import Event, Job


def check_examples(prompts: list[list[int]], targets: list[list[int]]) -> None:
    """What every engine's Score refuses before any work: no examples, a missing target, an empty side."""
    if not prompts or len(prompts) != len(targets):
        raise InvalidRequestError(f"scoring needs at least one example, each with a target (got {len(prompts)} inputs, {len(targets)} targets)")
    if any(not p for p in prompts) or any(not t for t in targets):
        raise InvalidRequestError("every example needs a non-empty input and target (after tokenising)")


class ServingEngine(Protocol):
    name: str  # "builtin" or "vllm"
    state: str  # "starting", "serving", "restarting", "failed", "stopped"
    stats: dict  # tokens, requests, faults, batch_size: read by metrics

    def submit(self, request: Request, adapter: Choice | Hold, emit: Callable[[Event], None], tenant: Hashable = None) -> Request:
        """Queue a generation; its tokens arrive through `emit` (it must not raise). A `Hold` the
        caller took is the engine's once this returns (it releases it when the request ends); the
        caller keeps it if this raises. Every method taking an adapter takes a `Hold` the same way."""

    def check_room(self, tenant: Hashable = None) -> None:
        """Refuse now what `submit` would refuse for room (a full queue or tenant share)."""

    def cancel_request(self, request: Request) -> None:
        """The caller is gone: the generation leaves the engine now or at its next step."""

    def score(
        self,
        adapter: Choice,
        prompts: list[list[int]],
        targets: list[list[int]],
        source_weights: torch.Tensor | None = None,
        cancelled: threading.Event | None = None,
        tenant: Hashable = None,
    ) -> Job:
        """Summed target NLL per example (`job.future`, a tensor); `source_weights` (rows,
        n_sources) weighs a group's adapters per row."""

    def run(self, adapter: Choice, work: Callable[[object, Job], object], cancelled: threading.Event | None = None, tenant: Hashable = None) -> Job:
        """Run `work(route, job)` on `job_runtime()` with `adapter` in place (learned fits)."""

    def job_runtime(self) -> Runtime:
        """The transformers model `run` work executes on (vLLM: a private copy, loaded on first use)."""

    def cancel(self, cancelled: threading.Event) -> None:
        """Every queued job sharing this event ends now."""

    @property
    def queue_depth(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop; every request still held ends with UNAVAILABLE, and nothing the engine started keeps running."""
