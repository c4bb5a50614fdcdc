"""What this server serves and what a request may spend of it: the served model (whatever engine
runs it) and the service's own caps, checked before work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.encoding import Encoder
from adapter_fusion.errors import InvalidRequestError, LimitExceededError
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.limits import Limits
from adapter_fusion.lorahub import MAX_SOURCES


@dataclass(frozen=True)
class ServiceLimits:
    max_examples: int = 256  # examples per Score, SearchWeights or data-aware recipe
    max_text_bytes: int = 64 << 10  # any one prompt, input or target, refused before tokenising
    inline_cache_size: int = 16  # inline compositions kept, least recently used dropped
    max_search_budget: int = 1000  # SearchWeights evaluations (lorahub) or Adam steps (learned)
    max_search_parallel: int = 64  # SearchWeights candidates per batched pass
    max_data_sources: int = 8  # regmean / fisher sources per recipe: each keeps per-module statistics (~1 GB on SmolLM2)
    max_recipe_sources: int = 64  # sources of any recipe (the same adapter may be named many times)
    max_output_rank: int = 1024  # a composed adapter's rank in any module
    max_dense_values: int = 2_000_000_000  # source ΔW values an elementwise method (ties, dare, ...) forms: ~20 SmolLM2-sized sources
    output_quota_bytes: int = 20 << 30  # what each write root may hold (exports, bakes): a SmolLM2 bake is ~540 MB
    fit_batch_tokens: int = 2048  # padded tokens per micro-batch of a learned fit (one longer example runs alone)
    max_fit_memory_mb: int = 4096  # a data-aware fit's estimated peak (model copy, activations, statistics), MB
    max_fit_work_tokens: int = 1_000_000  # example tokens a fit runs: × steps (learned), over every source (regmean, fisher)

    def fit_bounds(self) -> FitBounds:
        """What a data-aware composition may cost, as the library checks it before any work."""
        return FitBounds(self.fit_batch_tokens, self.max_fit_memory_mb << 20, self.max_fit_work_tokens)

    @staticmethod
    def under_cap(what: str, value: int, cap: int) -> int:
        if value > cap:
            raise LimitExceededError(f"{what} {value} is over this server's cap of {cap}")
        return value

    def check_learned(self, n_sources: int, steps: int, what: str) -> int:
        """What a learned fit may cost here, from SearchWeights or a recipe alike: its sources side
        by side in one slot, its Adam steps (`what` names them in the error)."""
        if not 1 <= n_sources <= MAX_SOURCES:
            raise InvalidRequestError(f"learned needs 1..{MAX_SOURCES} adapters, got {n_sources}")
        return self.under_cap(what, steps, self.max_search_budget)


@dataclass(frozen=True)
class ServedModel:
    """What the service knows of the base model, whatever engine runs it: where it is (composes and
    bakes read it), the device fits run on, its tokenizer, and what one request may ask of it."""

    base_dir: Path
    device: str
    encoder: Encoder
    limits: Limits
