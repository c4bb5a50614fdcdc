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

import functools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from adapter_fusion.adapters import Adapter, check_compatible
from adapter_fusion.base_model import open_encoder
from adapter_fusion.errors import RecipeError
from adapter_fusion.fit_cost import FitBounds, FitCost, ModelShape, batch_rows, learned_cost
from adapter_fusion.fit_guard import Tick, releasing, stop_points
from adapter_fusion.lorahub import SearchCancelled, tokenize_examples
from adapter_fusion.merge import MergeResult, get_method, merge, parse_parameters
from adapter_fusion.merge.driver import ProgressCallback
from adapter_fusion.merge.learned import LearnedParams
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


def learned_settings(settings: LearnedParams | dict | None = None) -> LearnedParams:
    """A fit's settings (per, steps, lr, l1, bound, batch_size) checked once, by the `learned`
    method's parameter model: a recipe, the server and the library refuse the same values alike."""
    return parse_parameters(get_method("learned"), settings)


def check_counts(n_sources: int, n_examples: int) -> None:
    if n_sources < 1:
        raise RecipeError("learned coefficients need at least one adapter")
    if n_examples < 1:
        raise RecipeError("learned coefficients need at least one example")


CHUNK_ROWS = 32  # examples per forward and backward at most: memory stays that of a batch the engine decodes


class CoefficientFit:
    """One fit's state, advanced an Adam step at a time by whoever owns the runtime: the loop in
    `fit_coefficients`, or the server's engine thread, where each piece of a step (at most
    `chunk_rows` examples forward and backward) is one job between decode steps, so streams keep
    flowing. Every piece needs the sources side by side in the slot `route`. A piece holds at
    most `chunk_rows` examples and, when `chunk_tokens` is set, at most that many padded tokens
    (an example longer than that runs alone): its memory is bounded by tokens, not by rows."""

    def __init__(
        self,
        runtime: Runtime,
        adapters: Sequence[Adapter],
        prompts: list[list[int]],
        targets: list[list[int]],
        settings: LearnedParams | dict | None = None,
        *,
        init: Sequence[float] | None = None,
        seed: int = 0,
        chunk_rows: int = CHUNK_ROWS,
        chunk_tokens: int | None = None,
    ) -> None:
        check_compatible(adapters)
        check_counts(len(adapters), len(prompts))
        self.settings = settings = learned_settings(settings)
        init = [1.0] * len(adapters) if init is None else [float(w) for w in init]
        if len(init) != len(adapters):
            raise RecipeError(f"got {len(init)} initial coefficients for {len(adapters)} adapters")
        self.runtime, self.prompts, self.targets = runtime, prompts, targets
        self.l1, self.bound, self.batch_size, self.chunk_rows = settings.l1, settings.bound, settings.batch_size, chunk_rows
        self.chunk_tokens = chunk_tokens
        paths = [path for path in runtime.layers if any(path in a.modules for a in adapters)]
        self.groups = coefficient_groups(paths, settings.per)
        self.coefficients = torch.tensor([init] * (max(self.groups.values()) + 1), requires_grad=True)  # (groups, n)
        self.optimizer = torch.optim.Adam([self.coefficients], lr=settings.lr)
        self.order = torch.Generator().manual_seed(seed)
        self.result = FitResult(coefficients={})
        self.best: torch.Tensor | None = None  # (groups, n): the best step's coefficients
        self._loss = 0.0  # the current step's mean target loss so far
        self._start: torch.Tensor | None = None  # (groups, n): the coefficients the current step started from

    def step(self, route: int) -> float:
        """One Adam step over every example (in minibatches if asked); the objective at the
        coefficients the step started from."""
        for piece in self.pieces():
            piece(route)
        return self.result.losses[-1]

    def pieces(self) -> Iterator[Callable[[int], None]]:
        """One Adam step as pieces to run in order, each given the slot `route`: forward and
        backward of one chunk (gradients summed over a minibatch, each chunk's loss divided by
        the minibatch's target tokens: the same objective), the update after a minibatch's last
        chunk; the last piece records the step."""
        n = len(self.prompts)
        shuffled = torch.randperm(n, generator=self.order).tolist() if self.batch_size else list(range(n))
        size = self.batch_size or n
        for at in range(0, n, size):
            batch = shuffled[at : at + size]
            tokens = sum(len(self.targets[i]) for i in batch)
            widths = [len(self.prompts[i]) + len(self.targets[i]) for i in batch]
            c = 0
            for size in batch_rows(widths, self.chunk_tokens or sum(widths), self.chunk_rows):
                rows = batch[c : c + size]
                yield functools.partial(self._accumulate, rows, tokens, len(batch), first=at == 0 and c == 0, last=c + size >= len(batch))
                c += size
        yield self._record

    def _accumulate(self, rows: list[int], tokens: int, batch: int, route: int, first: bool, last: bool) -> None:
        runtime, started = self.runtime, time.perf_counter()
        if first:
            self._loss, self._start = 0.0, self.coefficients.detach().clone()
            self.optimizer.zero_grad()  # nothing left over from a step that stopped midway
        widths = torch.tensor(runtime.slots.placements[route].widths)  # rank columns per source
        scales = {path: self.coefficients[g].repeat_interleave(widths).to(runtime.device, runtime.dtype) for path, g in self.groups.items()}
        with runtime.scaled(scales):
            nll = runtime.target_nll([self.prompts[i] for i in rows], [self.targets[i] for i in rows], [route] * len(rows), differentiable=True)
        part = nll.sum() / tokens  # this chunk's share of the minibatch's mean loss per token
        part.backward()
        self._loss += float(part.detach()) * batch / len(self.prompts)
        if last:
            (self.l1 * self.coefficients.abs().mean()).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            with torch.no_grad():
                self.coefficients.clamp_(-self.bound, self.bound)
        self.result.seconds += time.perf_counter() - started

    def _record(self, route: int) -> None:
        value = self._loss + self.l1 * float(self._start.abs().mean())
        self.result.losses.append(value)
        if math.isfinite(value) and value < self.result.best_loss:
            self.result.best_loss, self.best = value, self._start
            self.result.coefficients = {path: self._start[g].tolist() for path, g in self.groups.items()}

    def source_weights(self) -> list[float]:
        """The best step's coefficient per source (the mean over layers or modules when finer)."""
        return [] if self.best is None else self.best.mean(dim=0).tolist()

    def finish(self) -> FitResult:
        if not self.result.coefficients:
            raise RecipeError("the loss was not finite at any step; lower lr or check the examples")
        return self.result


def fit_coefficients(
    runtime: Runtime,
    adapters: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    settings: LearnedParams | dict | None = None,
    *,
    init: Sequence[float] | None = None,
    seed: int = 0,
    chat: bool = True,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    bounds: FitBounds = FitBounds(),
    tick: Tick | None = None,
) -> FitResult:
    """Fit coefficients (`settings.per` source, layer or module, starting from `init`, default 1
    each) by Adam on the examples' target loss, clamped to ±`settings.bound`; full batch unless
    `settings.batch_size` (minibatches in a seeded order), each step in micro-batches of
    `bounds.batch_tokens` (gradients accumulated: the same step). The cost is checked against
    `bounds` before any forward; `tick` runs between micro-batches and blocks (raising from it
    stops the fit). Returns the coefficients of the best step seen."""
    adapters, settings = list(adapters), learned_settings(settings)
    check_counts(len(adapters), len(examples))
    prompts, targets = tokenize_examples(runtime, examples, chat)
    shape = ModelShape.of(runtime.base_dir)
    learned_cost(shape, [len(p) for p in prompts], [len(t) for t in targets], settings.steps, bounds, runtime.dtype.itemsize).check(bounds)
    fit = CoefficientFit(runtime, adapters, prompts, targets, settings, init=init, seed=seed, chunk_tokens=bounds.batch_tokens)
    runtime.set_slots([adapters])
    with stop_points(runtime.model, tick):
        for step in range(settings.steps):
            if should_stop is not None and should_stop():
                raise SearchCancelled("fitting the coefficients was cancelled")
            for piece in fit.pieces():
                if tick is not None:
                    tick()
                piece(1)
            if on_step is not None:
                on_step(step + 1, settings.steps, fit.result.losses[-1])
    return fit.finish()


def examples_cost(base_dir: str | Path, examples: Sequence[tuple[str, str]], chat: bool, steps: int, bounds: FitBounds) -> FitCost:
    """A learned fit's cost from the tokenizer and the checkpoint's shapes alone, before a model
    is loaded: token counts as `tokenize_examples` makes them (`Encoder.example_ids`)."""
    shape = ModelShape.of(base_dir)  # first: a path that is no model says so
    encoder = open_encoder(base_dir)
    pairs = [encoder.example_ids(x, y, chat) for x, y in examples]
    return learned_cost(shape, [len(p) for p, _ in pairs], [len(t) for _, t in pairs], steps, bounds)


def learned_adapter(
    sources: Sequence[Adapter],
    fit: FitResult,
    p: LearnedParams,
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    seed: int = 0,
    name: str = "learned",
    on_module: ProgressCallback | None = None,
) -> MergeResult:
    """Σ cᵢΔWᵢ per module with a fit's coefficients; the fit's curve kept in the adapter's extra."""
    statistics = {path: [torch.tensor(c) for c in cs] for path, cs in fit.coefficients.items()}
    result = merge(list(sources), "learned", weights, p, rank=rank, seed=seed, name=name, on_module=on_module, statistics=statistics)
    result.adapter.extra["learned"] = {
        "per": p.per, "coefficients": fit.coefficients, "losses": fit.losses, "best_loss": fit.best_loss, "seconds": fit.seconds
    }
    return result


def merge_learned(
    sources: Sequence[Adapter],
    examples: Sequence[tuple[str, str]],
    base: str | Path | Runtime | None = None,
    weights: Sequence[float] | None = None,
    parameters: LearnedParams | dict | None = None,
    *,
    rank: int | None = None,
    seed: int = 0,
    name: str = "learned",
    chat: bool = True,
    device: str | None = None,
    on_module: ProgressCallback | None = None,
    on_step: StepCallback | None = None,
    bounds: FitBounds = FitBounds(),
    tick: Tick | None = None,
) -> MergeResult:
    """The `learned` method end to end: fit the coefficients on `examples` (one set shared by all
    sources) through `base` (a model dir, a loaded Runtime, or None: the default base), starting
    from `weights`, then merge Σ cᵢΔWᵢ per module. The fit's curve is kept in the adapter's extra.
    Over `bounds`, refused before a model is loaded; a model loaded here is released after."""
    from adapter_fusion.models import default_base

    p = learned_settings(parameters)
    fitting = {"init": weights, "seed": seed, "chat": chat, "on_step": on_step, "bounds": bounds, "tick": tick}
    if isinstance(base, Runtime):
        fit = fit_coefficients(base, sources, examples, p, **fitting)
    else:
        base = base or default_base()
        check_counts(len(sources), len(examples))
        examples_cost(base, examples, chat, p.steps, bounds).check(bounds)
        with releasing():  # the model copy is this fit's alone
            fit = fit_coefficients(Runtime(base, device=device), sources, examples, p, **fitting)
    return learned_adapter(sources, fit, p, weights, rank=rank, seed=seed, name=name, on_module=on_module)
