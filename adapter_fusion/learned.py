"""Learned composition coefficients: LoraHub's weights found by gradient descent, per source,
per layer or per module.

LoraHub searches one weight per adapter with a black-box optimizer because its merge is a state
dict rebuilt per candidate. Here the sources sit side by side in one slot and each layer scales
their rank columns (`lora_layers.scale_columns`), so the model computes the exact Σ cᵢΔWᵢ with
the coefficients as differentiable inputs: the target loss of a few examples has a gradient, and
Adam needs a few dozen steps where a search needs many evaluations, even with one coefficient per
module. The objective is LoraHub's: mean target cross-entropy per token + l1·mean|c|.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from adapter_fusion.adapters import Adapter, check_compatible
from adapter_fusion.errors import RecipeError
from adapter_fusion.lorahub import SearchCancelled, tokenize_examples
from adapter_fusion.merge import MergeResult, get_method, merge, parse_parameters
from adapter_fusion.merge.driver import ProgressCallback
from adapter_fusion.runtime import Runtime

Granularity = Literal["source", "layer", "module"]
StepCallback = Callable[[int, int, float], None]  # (step, steps, objective at that step)
_LAYER = re.compile(r"\.(\d+)\.")  # the block index in a module path: "model.layers.3.mlp.up_proj"


@dataclass
class FitResult:
    coefficients: dict[str, list[float]]  # per module path, one per source: the best step's
    losses: list[float] = field(default_factory=list)  # objective per step, before its update
    best_loss: float = math.inf
    seconds: float = 0.0


def coefficient_groups(paths: Sequence[str], per: Granularity) -> dict[str, int]:
    """Which coefficient vector each module uses: one for all (`source`), one per transformer block
    (`layer`: the first number in the path; paths without one share a group), or one per module."""
    if per == "source":
        return dict.fromkeys(paths, 0)
    if per == "module":
        return {path: i for i, path in enumerate(paths)}
    keys = {path: (m.group(1) if (m := _LAYER.search(f".{path}.")) else "") for path in paths}
    order = {key: i for i, key in enumerate(dict.fromkeys(keys.values()))}
    return {path: order[key] for path, key in keys.items()}


def check_fit(n_sources: int, n_examples: int, steps: int, lr: float, l1: float, bound: float, batch_size: int | None) -> None:
    if n_sources < 1:
        raise RecipeError("learned coefficients need at least one adapter")
    if n_examples < 1:
        raise RecipeError("learned coefficients need at least one example")
    if not 1 <= steps <= 10_000:
        raise RecipeError(f"steps must be in 1..10000, got {steps}")
    if not (math.isfinite(lr) and 0 < lr <= 10):
        raise RecipeError(f"lr must be in (0, 10], got {lr}")
    if not (math.isfinite(l1) and 0 <= l1 <= 1e3):
        raise RecipeError(f"l1 must be a finite number in [0, 1000], got {l1}")
    if not (math.isfinite(bound) and 0 < bound <= 1e3):
        raise RecipeError(f"bound must be a finite number in (0, 1000], got {bound}")
    if batch_size is not None and batch_size < 1:
        raise RecipeError(f"batch_size must be >= 1, got {batch_size}")


def fit_coefficients(
    runtime: Runtime,
    adapters: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    per: Granularity = "source",
    init: Sequence[float] | None = None,
    steps: int = 30,
    lr: float = 0.1,
    l1: float = 0.05,
    bound: float = 1.5,
    batch_size: int | None = None,
    seed: int = 0,
    chat: bool = True,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Fit coefficients (`per` source, layer or module, starting from `init`, default 1 each) by
    Adam on the examples' target loss, clamped to ±`bound`; full batch unless `batch_size`
    (minibatches in a seeded order). Returns the coefficients of the best step seen."""
    adapters = list(adapters)
    check_compatible(adapters)
    check_fit(len(adapters), len(examples), steps, lr, l1, bound, batch_size)
    init = [1.0] * len(adapters) if init is None else [float(w) for w in init]
    if len(init) != len(adapters):
        raise RecipeError(f"got {len(init)} initial coefficients for {len(adapters)} adapters")
    prompts, targets = tokenize_examples(runtime, examples, chat)
    runtime.set_slots([adapters])
    widths = torch.tensor(runtime.slots.placements[1].widths)  # rank columns per source
    paths = [path for path in runtime.layers if any(path in a.modules for a in adapters)]
    groups = coefficient_groups(paths, per)
    coefficients = torch.tensor([init] * (max(groups.values()) + 1), requires_grad=True)  # (groups, n)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    order = torch.Generator().manual_seed(seed)
    size = batch_size or len(prompts)
    result = FitResult(coefficients={})
    start = time.perf_counter()
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise SearchCancelled("fitting the coefficients was cancelled")
        shuffled = torch.randperm(len(prompts), generator=order).tolist() if batch_size else list(range(len(prompts)))
        total = 0.0
        for at in range(0, len(shuffled), size):
            batch = shuffled[at : at + size]
            optimizer.zero_grad()
            scales = {path: coefficients[g].repeat_interleave(widths).to(runtime.device, runtime.dtype) for path, g in groups.items()}
            with runtime.scaled(scales):
                nll = runtime.target_nll([prompts[i] for i in batch], [targets[i] for i in batch], [1] * len(batch), differentiable=True)
            loss = nll.sum() / sum(len(targets[i]) for i in batch)
            objective = loss + l1 * coefficients.abs().mean()
            total += float(loss.detach()) * len(batch) / len(prompts)
            if len(batch) == len(prompts) or at == 0:  # the state this step started from
                snapshot = coefficients.detach().clone()
            objective.backward()
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(-bound, bound)
        value = total + l1 * float(snapshot.abs().mean())
        result.losses.append(value)
        if math.isfinite(value) and value < result.best_loss:
            result.best_loss = value
            result.coefficients = {path: snapshot[g].tolist() for path, g in groups.items()}
        if on_step is not None:
            on_step(step + 1, steps, value)
    if not result.coefficients:
        raise RecipeError("the loss was not finite at any step; lower lr or check the examples")
    result.seconds = time.perf_counter() - start
    return result


def merge_learned(
    sources: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    base: str | Path | Runtime | None = None,
    weights: Sequence[float] | None = None,
    parameters: dict | None = None,
    rank: int | None = None,
    seed: int = 0,
    name: str = "learned",
    chat: bool = True,
    device: str | None = None,
    on_module: ProgressCallback | None = None,
    on_step: StepCallback | None = None,
) -> MergeResult:
    """The `learned` method end to end: fit the coefficients on `examples` (one set shared by all
    sources) through `base` (a model dir, a loaded Runtime, or None: the default base), starting
    from `weights`, then merge Σ cᵢΔWᵢ per module. The fit's curve is kept in the adapter's extra."""
    from adapter_fusion.models import default_base

    p = parse_parameters(get_method("learned"), parameters)
    runtime = base if isinstance(base, Runtime) else Runtime(base or default_base(), device=device)
    fit = fit_coefficients(
        runtime, sources, examples, p.per, weights, p.steps, p.lr, p.l1, p.bound, p.batch_size, seed, chat, on_step
    )
    statistics = {path: [torch.tensor(c) for c in cs] for path, cs in fit.coefficients.items()}
    result = merge(list(sources), "learned", weights, p, rank, seed, name, on_module, statistics=statistics)
    result.adapter.extra["learned"] = {
        "per": p.per, "coefficients": fit.coefficients, "losses": fit.losses, "best_loss": fit.best_loss, "seconds": fit.seconds
    }
    return result
