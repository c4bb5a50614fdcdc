"""What one server lets a request ask for and hold: sizes, queue, memory, fault tolerance."""

from __future__ import annotations

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

    def check(self, request: Request) -> None:
        """Refuse a generation outside the limits; fill in its default length."""
        if not request.prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise LimitExceededError(f"the prompt has {len(request.prompt_ids)} tokens; the limit is {self.max_prompt_tokens}")
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
