"""Elementwise merges on one module's dense deltas: TIES, DARE, magnitude pruning, Breadcrumbs, DELLA.

Their rules act on individual entries of ΔW, so they need dense deltas; they are computed in
blocks of rows, recomputed from the factors (B[rows] @ A, cheap), so every step of a rule runs on
cache-sized tensors and only the merged (out, in) result is ever whole. Per-source magnitude
thresholds come first, from one streamed pass each. The merge then re-factors the result to the
requested rank.

Defaults follow PEFT's dense-delta rules (its `*_svd` variants): prune each source's tensor
separately, elect signs on the unweighted pruned deltas, weight, and divide the agreeing sum by
the number of agreeing sources. mergekit's rules (generalized_task_arithmetic.py, sparsify.py)
are options: `sign_from: weighted` (vote on w·delta), `divide_by: weights` (its `normalize:
true`) or `none` (`normalize: false`), `zero_divisor: one` (a zero agreeing-weight sum divides by
1), `lambda`, DARE's `rescale_norm: l1` (match the L1 norm instead of 1/density), and `on_empty:
error` (mergekit asserts when int(density·n) = 0; `keep_one` keeps the largest entry instead).
Thresholds keep every entry tied with the k-th largest where mergekit's argsort keeps exactly k;
with continuous values there are no ties. Random drops are seeded per (seed, module, source) and
drawn in row order, so they equal one whole-tensor draw from the same generator (mergekit's are
unseeded: only the rule, not the draw, can match).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from adapter_fusion.errors import RecipeError
from adapter_fusion.merge import _ops
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params

Density = Annotated[float, Field(gt=0.0, le=1.0, description="fraction of entries kept")]
SAMPLE_ROWS = 64  # rows per source sampled to bracket a magnitude threshold
SignFrom = Literal["deltas", "weighted"]  # vote on the pruned deltas (PEFT) or on w·delta (mergekit)
OnEmpty = Literal["zero", "keep_one", "error"]  # what int(density·n) = 0 entries kept means
RescaleNorm = Literal["inverse", "l1"]  # DARE's exact 1/density, or mergekit's L1 norm matching
Lambda = Annotated[float, Field(alias="lambda", ge=-1e4, le=1e4)]


class PruneParams(Params):
    density: Density = 0.2
    on_empty: OnEmpty = "zero"


class TiesParams(Params):
    density: Density = 0.2
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"
    sign_from: SignFrom = "deltas"
    zero_divisor: _ops.ZeroDivisor = "zero"
    lambda_: Lambda = 1.0  # scales the merged update (mergekit's `lambda`)
    on_empty: OnEmpty = "zero"


class DareParams(Params):
    density: Density = 0.5  # keep probability; DARE's drop rate p = 1 - density
    rescale: bool = True  # rescale the survivors (how: rescale_norm)
    rescale_norm: RescaleNorm = "inverse"


class DareTiesParams(DareParams):
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"
    sign_from: SignFrom = "deltas"
    zero_divisor: _ops.ZeroDivisor = "zero"
    lambda_: Lambda = 1.0


class BreadcrumbsParams(PruneParams):
    density: Density = 0.9
    gamma: Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of largest entries dropped")] = 0.01

    @model_validator(mode="after")
    def _fits(self) -> BreadcrumbsParams:
        if self.density + self.gamma > 1.0:
            raise ValueError(f"density + gamma must be <= 1, got {self.density} + {self.gamma}")
        return self


class DellaParams(Params):
    density: Density = 0.7
    epsilon: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    lambda_: Lambda = 1.0
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"
    sign_from: SignFrom = "deltas"
    zero_divisor: _ops.ZeroDivisor = "zero"

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParams:
        low, high = self.density - self.epsilon / 2, self.density + self.epsilon / 2
        if low <= 0.0 or high > 1.0:
            raise ValueError(f"keep probabilities density±epsilon/2 = [{low:g}, {high:g}] must lie in (0, 1]")
        return self


Consensus = TiesParams | DareTiesParams | DellaParams


def _weights(module: ModuleSources) -> Tensor:
    return torch.tensor(module.weights, dtype=torch.float32)


def magnitude_threshold(module: ModuleSources, source: int, keep: int) -> float:
    """The |value| of source's keep-th largest ΔW entry: entries at or above it are its top `keep`."""
    delta, n = module.deltas[source], module.shape[0] * module.shape[1]
    if delta is None or keep <= 0:
        return math.inf
    if keep >= n:
        return 0.0
    rows = torch.linspace(0, module.shape[0] - 1, min(SAMPLE_ROWS, module.shape[0])).long()
    sample = (delta.B[rows] @ delta.A).abs()

    def blocks():
        return (module.dense_rows(source, rows).abs() for rows in module.row_blocks())

    return _ops.kth_largest_streamed(blocks, n, keep, sample)


def _blockwise(module: ModuleSources, rule: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply rule((n_sources, rows, in) block) -> (rows, in) over row blocks of the module."""
    out = torch.empty(module.shape)
    for rows in module.row_blocks():
        out[rows] = rule(torch.stack([module.dense_rows(i, rows) for i in range(len(module.deltas))]))
    return out


def kept_count(module: ModuleSources, density: float, on_empty: OnEmpty) -> int:
    """How many entries of each source's tensor a magnitude rule keeps: int(density·n), with
    `on_empty` deciding what a density too small to keep any entry means."""
    n = module.shape[0] * module.shape[1]
    keep = n if density >= 1.0 else int(density * n)
    if keep > 0 or on_empty == "zero":
        return keep
    if on_empty == "keep_one":
        return 1
    raise RecipeError(
        f"density {density:g} keeps no entry of module {module.path!r} ({n} entries, int(density·n) = 0); "
        "raise the density, or set on_empty: keep_one (or zero)"
    )


def _top(module: ModuleSources, density: float, on_empty: OnEmpty) -> list[float]:
    keep = kept_count(module, density, on_empty)
    return [magnitude_threshold(module, i, keep) for i in range(len(module.deltas))]


def _elect_and_merge(stacked: Tensor, module: ModuleSources, p: Consensus) -> Tensor:
    """Sign election on the deltas or on w·delta (`sign_from`), disjoint merge, times lambda."""
    w = _weights(module)
    voters = stacked * w.view(-1, *([1] * (stacked.dim() - 1))) if p.sign_from == "weighted" else stacked
    agree = _ops.majority_sign_mask(voters, p.majority_sign)
    return p.lambda_ * _ops.disjoint_merge(stacked, w, agree, p.divide_by, p.zero_divisor)


def ties(module: ModuleSources, p: TiesParams) -> Tensor:
    """TIES (Yadav et al. 2023): trim to top-`density` per source, elect sign, disjoint mean."""
    low = _top(module, p.density, p.on_empty)
    return _blockwise(module, lambda block: _elect_and_merge(torch.stack([_ops.keep_band(t, lo) for t, lo in zip(block, low)]), module, p))


def magnitude_prune(module: ModuleSources, p: PruneParams) -> Tensor:
    """Keep each source's top-`density` entries by magnitude, then the weighted sum (PEFT)."""
    low = _top(module, p.density, p.on_empty)
    w = _weights(module)
    return _blockwise(module, lambda block: _ops.weighted_sum(torch.stack([_ops.keep_band(t, lo) for t, lo in zip(block, low)]), w))


def breadcrumbs(module: ModuleSources, p: BreadcrumbsParams) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the `gamma` fraction of largest entries
    (outliers) and keep the next `density` fraction; smaller ones are dropped too. Weighted sum."""
    n = module.shape[0] * module.shape[1]
    top = int(p.gamma * n)
    keep = min(kept_count(module, p.density, p.on_empty), n - top)
    low = [magnitude_threshold(module, i, top + keep) for i in range(len(module.deltas))]
    high = [magnitude_threshold(module, i, top) if top > 0 else math.inf for i in range(len(module.deltas))]
    w = _weights(module)
    return _blockwise(
        module, lambda block: _ops.weighted_sum(torch.stack([_ops.keep_band(t, lo, hi) for t, lo, hi in zip(block, low, high)]), w)
    )


def _l1_factors(module: ModuleSources, density: float) -> list[float]:
    """Per source, mergekit's ‖t‖₁ / ‖t ⊙ mask‖₁, from a first pass that draws the same masks
    (same generators, same row order) as the merge pass that follows."""
    factors = []
    for i in range(len(module.deltas)):
        g, before, after = module.generator(i), 0.0, 0.0
        for rows in module.row_blocks():
            t = module.dense_rows(i, rows)
            kept = t * (torch.rand(t.shape, generator=g) < density)
            before, after = before + float(t.abs().double().sum()), after + float(kept.abs().double().sum())
        factors.append(_ops.l1_rescale_factor(before, after))
    return factors


def _dare_drop(module: ModuleSources, p: DareParams) -> Callable[[Tensor], Tensor]:
    l1 = p.rescale and p.rescale_norm == "l1" and p.density < 1.0
    factors = _l1_factors(module, p.density) if l1 else [1.0] * len(module.deltas)
    generators = [module.generator(i) for i in range(len(module.deltas))]  # consumed in row order
    inverse = p.rescale and not l1
    return lambda block: torch.stack(
        [_ops.prune_random(t, p.density, g, inverse) * f for t, g, f in zip(block, generators, factors)]
    )


def dare_linear(module: ModuleSources, p: DareParams) -> Tensor:
    """DARE (Yu et al. 2024): drop entries with probability 1-density, rescale, weighted sum."""
    drop, w = _dare_drop(module, p), _weights(module)
    return _blockwise(module, lambda block: _ops.weighted_sum(drop(block), w))


def dare_ties(module: ModuleSources, p: DareTiesParams) -> Tensor:
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    drop = _dare_drop(module, p)
    return _blockwise(module, lambda block: _elect_and_merge(drop(block), module, p))


def della(module: ModuleSources, p: DellaParams) -> Tensor:
    """DELLA (Deep et al. 2024): magnitude-ranked random drop (MAGPRUNE, ranked per tensor),
    rescale by each entry's keep probability, elect sign, disjoint mean, times lambda. Ranks
    need the whole tensor, so DELLA works on whole dense deltas."""
    stacked = torch.stack(
        [
            _ops.prune_magnitude_ranked(t, p.density, p.epsilon, module.generator(i))
            for i, t in enumerate(module.dense_stack())
        ]
    )
    return _elect_and_merge(stacked, module, p)


TIES = MergeMethod("ties", ties, TiesParams, "TIES: trim, elect sign, disjoint mean; re-factored to `rank`", dense=True)
DARE_LINEAR = MergeMethod("dare_linear", dare_linear, DareParams, "DARE drop-and-rescale, weighted sum", dense=True)
DARE_TIES = MergeMethod("dare_ties", dare_ties, DareTiesParams, "DARE drop-and-rescale, then TIES sign election", dense=True)
MAGNITUDE_PRUNE = MergeMethod("magnitude_prune", magnitude_prune, PruneParams, "top-density by magnitude, weighted sum", dense=True)
BREADCRUMBS = MergeMethod("breadcrumbs", breadcrumbs, BreadcrumbsParams, "drop outliers (gamma) and small entries, weighted sum", dense=True)
DELLA = MergeMethod("della", della, DellaParams, "magnitude-ranked random drop, rescale, TIES sign election", dense=True)
