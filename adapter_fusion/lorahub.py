"""LoraHub: composition weights found by black-box search (nevergrad) on a few examples.

The paper's defaults: weights in [-1.5, 1.5] starting at 0, objective = mean target
cross-entropy + 0.05·mean|w|, 40 evaluations of NGOpt, all configurable. Unlike the original,
which rebuilds and reloads a merged state dict for every candidate, the sources are installed
once as one slot of concatenated factors and a candidate is only a vector of per-source weights
applied per row: an evaluation is one forward pass over the (pre-tokenized) examples, and with
`parallel=k` the optimizer's k candidates share a single batched forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import nevergrad as ng
import numpy as np
import torch

from adapter_fusion.adapters import Adapter, check_compatible
from adapter_fusion.errors import AdapterFusionError, RecipeError, quoted
from adapter_fusion.merge import merge
from adapter_fusion.runtime import Runtime

MAX_BUDGET = 10_000
MAX_PARALLEL = 256  # candidates scored in one batched pass
MAX_SOURCES = 256
FAILED_LOSS = 1e6  # what nevergrad is told for a candidate whose loss is not finite
Objective = Callable[[np.ndarray], list[float]]  # (k, n_sources) weights -> k mean losses


class SearchCancelled(AdapterFusionError):
    """The caller stopped the search; nothing was composed or registered."""


@dataclass(frozen=True)
class SearchProgress:
    evaluations: int
    best_loss: float  # objective (loss + L1) of the best candidate so far
    best_weights: list[float]


@dataclass
class SearchResult:
    weights: list[float]
    best_loss: float  # objective of the best candidate (loss + L1)
    losses: list[float] = field(default_factory=list)  # objective per evaluation, in order
    seconds: float = 0.0
    adapter: Adapter | None = None


@dataclass(frozen=True)
class SearchSettings:
    """A LoraHub search's settings, refused on construction if any would fail late or run away (a
    huge `parallel` asks nevergrad for that many workers' state): before any work starts."""

    budget: int = 40  # evaluations
    optimizer: str = "NGOpt"  # any name in nevergrad.optimizers.registry
    seed: int = 0
    l1: float = 0.05  # penalty on mean |w|
    bound: float = 1.5  # weights searched in [-bound, bound]
    parallel: int = 1  # candidates scored in one batched pass

    def __post_init__(self) -> None:
        if not 0 < self.budget <= MAX_BUDGET:
            raise RecipeError(f"budget must be in 1..{MAX_BUDGET}, got {self.budget}")
        if self.optimizer not in ng.optimizers.registry:
            popular = ", ".join(o for o in ("NGOpt", "CMA", "TwoPointsDE", "OnePlusOne", "PSO", "RandomSearch") if o in ng.optimizers.registry)
            raise RecipeError(f"unknown nevergrad optimizer {quoted(self.optimizer)}; e.g. {popular} (any name in nevergrad.optimizers.registry)")
        if not 1 <= self.parallel <= min(MAX_PARALLEL, self.budget):
            raise RecipeError(f"parallel must be in 1..{min(MAX_PARALLEL, self.budget)} (at most the budget), got {self.parallel}")
        if not (math.isfinite(self.l1) and 0 <= self.l1 <= 1e3):
            raise RecipeError(f"l1 must be a finite number in [0, 1000], got {self.l1}")
        if not (math.isfinite(self.bound) and 0 < self.bound <= 1e3):
            raise RecipeError(f"bound must be a finite number in (0, 1000], got {self.bound}")
        if not 0 <= self.seed < 2**32:  # nevergrad's random state is numpy's
            raise RecipeError(f"seed must be in 0..2**32-1, got {self.seed}")


def check_counts(n_sources: int, n_examples: int) -> None:
    if not 1 <= n_sources <= MAX_SOURCES:
        raise RecipeError(f"LoraHub needs 1..{MAX_SOURCES} adapters, got {n_sources}")
    if n_examples < 1:
        raise RecipeError("LoraHub needs at least one example")


def search(
    objective: Objective,
    n_sources: int,
    settings: SearchSettings = SearchSettings(),
    *,
    on_progress: Callable[[SearchProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """Minimise objective(w) + l1·mean|w| over w in [-bound, bound]^n, seeded through nevergrad's
    own random state. Returns the best candidate evaluated (not a model-based guess)."""
    check_counts(n_sources, 1)
    budget, parallel, l1 = settings.budget, settings.parallel, settings.l1
    parametrization = ng.p.Array(init=np.zeros(n_sources), lower=-settings.bound, upper=settings.bound)
    parametrization.random_state = np.random.RandomState(settings.seed)
    opt = ng.optimizers.registry[settings.optimizer](parametrization=parametrization, budget=budget, num_workers=parallel)
    result = SearchResult(weights=[0.0] * n_sources, best_loss=math.inf)
    start = time.perf_counter()
    while len(result.losses) < budget:
        if should_stop is not None and should_stop():
            raise SearchCancelled("the weight search was cancelled")
        candidates = [opt.ask() for _ in range(min(parallel, budget - len(result.losses)))]
        weights = np.stack([c.value for c in candidates])  # (k, n)
        losses = objective(weights)
        for candidate, w, loss in zip(candidates, weights, losses):
            value = loss + l1 * float(np.abs(w).mean()) if math.isfinite(loss) else FAILED_LOSS
            opt.tell(candidate, value)
            result.losses.append(value)
            if value < result.best_loss:
                result.best_loss, result.weights = value, [float(x) for x in w]
        if on_progress is not None:
            on_progress(SearchProgress(len(result.losses), result.best_loss, list(result.weights)))
    result.seconds = time.perf_counter() - start
    return result


NllFunction = Callable[[list[list[int]], list[list[int]], torch.Tensor], torch.Tensor]  # (prompts, targets, weights per row) -> NLL per row


def _per_candidate(nll: torch.Tensor, k: int, tokens: int) -> list[float]:
    """(k·m,) summed NLL per row, candidate-major -> k mean losses per target token."""
    return [float(rows.sum()) / tokens for rows in nll.view(k, -1)]


def weighted_objective(nll: NllFunction, prompts: list[list[int]], targets: list[list[int]]) -> Objective:
    """k candidates -> k mean target cross-entropies per token, in one call to `nll` whose rows
    carry their candidate's per-source weights (the sources installed once, summed exactly)."""
    m, tokens = len(prompts), sum(len(t) for t in targets)

    def objective(weights: np.ndarray) -> list[float]:  # weights (k, n)
        k = weights.shape[0]
        per_row = torch.tensor(np.repeat(weights, m, axis=0), dtype=torch.float32)  # (k·m, n)
        out = nll(prompts * k, targets * k, per_row)  # (k·m,)
        return _per_candidate(out, k, tokens)

    return objective


def tokenize_examples(runtime: Runtime, examples: Sequence[tuple[str, str]], chat: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and target ids, once, as every fit learns them (`Encoder.example_ids`: user messages
    in the chat template unless `chat` is off; in a chat, targets end with the end of the turn)."""
    pairs = [runtime.encoder.example_ids(x, y, chat) for x, y in examples]
    return [p for p, _ in pairs], [t for _, t in pairs]


def runtime_objective(
    runtime: Runtime,
    adapters: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    rule: Literal["linear", "factor_linear"] = "linear",
    chat: bool = True,
) -> Objective:
    """Mean target cross-entropy per token for candidate weights, on a model loaded once.

    `linear` installs the sources once and weights them per row (exact Σ wᵢΔWᵢ); `factor_linear`
    (the original's (Σw·B)(Σw·A)) must rebuild one small slot per candidate, still batched."""
    check_compatible(list(adapters))
    prompts, targets = tokenize_examples(runtime, examples, chat)
    if rule == "linear":
        runtime.set_slots([list(adapters)])
        return weighted_objective(lambda p, t, w: runtime.target_nll(p, t, [1] * len(p), w), prompts, targets)
    if rule != "factor_linear":
        raise RecipeError(f"rule must be linear or factor_linear, got {rule!r}")
    merge(list(adapters), "factor_linear")  # refuses unequal ranks now, not mid-search
    m, tokens = len(prompts), sum(len(t) for t in targets)  # examples, target tokens

    def objective(weights: np.ndarray) -> list[float]:  # weights (k, n): one slot per candidate
        k = weights.shape[0]
        runtime.set_slots([[merge(list(adapters), "factor_linear", list(w)).adapter] for w in weights])
        nll = runtime.target_nll(prompts * k, targets * k, [c + 1 for c in range(k) for _ in range(m)])
        return _per_candidate(nll, k, tokens)

    return objective


def lorahub_search(
    runtime: Runtime,
    adapters: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    budget: int = 40,
    optimizer: str = "NGOpt",
    seed: int = 0,
    l1: float = 0.05,
    bound: float = 1.5,
    rule: Literal["linear", "factor_linear"] = "linear",
    parallel: int = 1,
    chat: bool = True,
    name: str = "lorahub",
    on_progress: Callable[[SearchProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SearchResult:
    """Search weights for `adapters` on (input, target) `examples`; the result carries the
    composed adapter (exact weighted sum, or the factor rule it was searched with)."""
    check_counts(len(adapters), len(examples))
    settings = SearchSettings(budget=budget, optimizer=optimizer, seed=seed, l1=l1, bound=bound, parallel=parallel)
    objective = runtime_objective(runtime, adapters, examples, rule, chat)
    result = search(objective, len(adapters), settings, on_progress=on_progress, should_stop=should_stop)
    result.adapter = merge(list(adapters), rule, result.weights, name=name).adapter
    result.adapter.extra["lorahub"] = {"weights": result.weights, "best_loss": result.best_loss, "optimizer": optimizer, "budget": budget, "seed": seed, "l1": l1}
    return result
