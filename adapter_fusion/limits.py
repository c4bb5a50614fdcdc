"""What one server lets a request ask for and hold: sizes, queue, memory, fault tolerance, and
what one request or one tenant (a connection) may cost everyone else."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from adapter_fusion.decoding import Request
from adapter_fusion.errors import InvalidRequestError, LimitExceededError


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 512  # cap on a request's max_new_tokens
    default_new_tokens: int = 64  # used when a request leaves it 0
    max_prompt_tokens: int = 2048  # prompts of Generate, inputs of Score and SearchWeights
    max_target_tokens: int = 512  # targets of Score and SearchWeights examples
    max_queue: int = 256  # requests waiting to join the batch
    max_batch: int = 32  # rows decoded (or scored) together
    memory_budget_bytes: int = 1 << 30  # resident adapter factors plus the slot buffers (their capacity)
    max_faults: int = 3  # faults within fault_window_s before the engine gives up ("failed")
    fault_window_s: float = 60.0
    restart_delay_s: float = 0.5  # NOT_SERVING this long after a fault, so balancers see it
    max_stop_strings: int = 16  # stop strings per Generate (each step matches them incrementally)
    max_stop_bytes: int = 1024  # their UTF-8 bytes together (the automaton and the text held back)
    max_job_tokens: int = 512  # rows x padded length one engine job piece (scoring, a fit's chunk) or one
    # admission's prefill may process between two decode steps: a stream's gap is about one such piece
    tenant_queue_share: float = 0.25  # of max_queue, the most one tenant (connection) may have waiting
    tenant_batch_share: float = 0.75  # of max_batch, the most rows one tenant may hold: the rest stay free for others

    def __post_init__(self) -> None:
        if not (0 < self.tenant_queue_share <= 1 and 0 < self.tenant_batch_share <= 1):
            raise InvalidRequestError(f"tenant queue and batch shares must be in (0, 1], got {self.tenant_queue_share} and {self.tenant_batch_share}")
        if self.max_job_tokens < 1:
            raise InvalidRequestError(f"max_job_tokens must be >= 1, got {self.max_job_tokens}")

    @property
    def tenant_queue(self) -> int:
        """Requests one tenant may have waiting (at least one)."""
        return max(1, math.floor(self.max_queue * self.tenant_queue_share))

    @property
    def tenant_rows(self) -> int:
        """Batch rows one tenant may hold (at least one)."""
        return max(1, math.floor(self.max_batch * self.tenant_batch_share))

    def check_stops(self, stops: Sequence[str]) -> None:
        """Refuse too many or too long stop strings, by count first (cheap however many were sent)."""
        if len(stops) > self.max_stop_strings:
            raise LimitExceededError(f"{len(stops)} stop strings; the limit is {self.max_stop_strings}")
        size = sum(len(s.encode("utf-8", "surrogatepass")) for s in stops)
        if size > self.max_stop_bytes:
            raise LimitExceededError(f"the stop strings are {size} bytes together; the limit is {self.max_stop_bytes}")

    def check(self, request: Request) -> None:
        """Refuse a generation outside the limits; fill in its default length."""
        if not request.prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise LimitExceededError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is {self.max_prompt_tokens}")
        self.check_stops(request.stop)
        if request.max_new_tokens == 0:
            request.max_new_tokens = self.default_new_tokens
        if not 0 < request.max_new_tokens <= self.max_new_tokens:
            raise LimitExceededError(f"max_new_tokens {request.max_new_tokens} is outside 1..{self.max_new_tokens}")
        if not (request.temperature >= 0 and request.temperature <= 100):
            raise InvalidRequestError(f"temperature must be in [0, 100], got {request.temperature}")
        if not (0 < request.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1] (0 is read as 1), got {request.top_p}")
        if request.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {request.top_k}")
