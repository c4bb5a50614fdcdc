"""Elementwise merges on one module's dense deltas: TIES, DARE, magnitude pruning, Breadcrumbs, DELLA.

Their rules act on individual entries of ΔW, so they need the dense (out, in) delta of each
source, one module at a time (memory bounded by one module); the merge then re-factors the
result to the requested rank. Defaults follow PEFT's dense-delta rules (its `*_svd` variants):
prune each source's tensor separately, elect signs on the unweighted pruned deltas, weight, and
divide the agreeing sum by the number of agreeing sources. `divide_by: weights` gives mergekit's
normalisation by the agreeing weights instead. Random drops are seeded per (seed, module, source).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, model_validator
from torch import Tensor

from adapter_fusion.merge import _ops
from adapter_fusion.merge.base import MergeMethod, ModuleSources, Params

Density = Annotated[float, Field(gt=0.0, le=1.0, description="fraction of entries kept")]


class PruneParams(Params):
    density: Density = 0.2


class TiesParams(PruneParams):
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"


class DareParams(Params):
    density: Density = 0.5  # keep probability; DARE's drop rate p = 1 - density
    rescale: bool = True  # divide survivors by density = exact 1/(1-p)


class DareTiesParams(DareParams):
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"


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
    lambda_: Annotated[float, Field(alias="lambda")] = 1.0
    majority_sign: _ops.SignRule = "total"
    divide_by: _ops.Divisor = "count"

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParams:
        low, high = self.density - self.epsilon / 2, self.density + self.epsilon / 2
        if low <= 0.0 or high > 1.0:
            raise ValueError(f"keep probabilities density±epsilon/2 = [{low:g}, {high:g}] must lie in (0, 1]")
        return self


def _weights(module: ModuleSources) -> Tensor:
    return torch.tensor(module.weights, dtype=torch.float32)


def ties(module: ModuleSources, p: TiesParams) -> Tensor:
    """TIES (Yadav et al. 2023): trim to top-`density` per source, elect sign, disjoint mean."""
    stacked = torch.stack([_ops.prune_magnitude(t, p.density) for t in module.dense_stack()])
    agree = _ops.majority_sign_mask(stacked, p.majority_sign)
    return _ops.disjoint_merge(stacked, _weights(module), agree, p.divide_by)


def _dare_drop(module: ModuleSources, p: DareParams) -> Tensor:
    return torch.stack(
        [_ops.prune_random(t, p.density, module.generator(i), p.rescale) for i, t in enumerate(module.dense_stack())]
    )


def dare_linear(module: ModuleSources, p: DareParams) -> Tensor:
    """DARE (Yu et al. 2024): drop entries with probability 1-density, rescale, weighted sum."""
    return _ops.weighted_sum(_dare_drop(module, p), _weights(module))


def dare_ties(module: ModuleSources, p: DareTiesParams) -> Tensor:
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    stacked = _dare_drop(module, p)
    agree = _ops.majority_sign_mask(stacked, p.majority_sign)
    return _ops.disjoint_merge(stacked, _weights(module), agree, p.divide_by)


def magnitude_prune(module: ModuleSources, p: PruneParams) -> Tensor:
    """Keep each source's top-`density` entries by magnitude, then the weighted sum (PEFT)."""
    stacked = torch.stack([_ops.prune_magnitude(t, p.density) for t in module.dense_stack()])
    return _ops.weighted_sum(stacked, _weights(module))


def breadcrumbs(module: ModuleSources, p: BreadcrumbsParams) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop outliers and small entries, weighted sum."""
    stacked = torch.stack([_ops.prune_breadcrumbs(t, p.density, p.gamma) for t in module.dense_stack()])
    return _ops.weighted_sum(stacked, _weights(module))


def della(module: ModuleSources, p: DellaParams) -> Tensor:
    """DELLA (Deep et al. 2024): magnitude-ranked random drop (MAGPRUNE, ranked per tensor),
    rescale by each entry's keep probability, elect sign, disjoint mean, times lambda."""
    stacked = torch.stack(
        [
            _ops.prune_magnitude_ranked(t, p.density, p.epsilon, module.generator(i))
            for i, t in enumerate(module.dense_stack())
        ]
    )
    agree = _ops.majority_sign_mask(stacked, p.majority_sign)
    return p.lambda_ * _ops.disjoint_merge(stacked, _weights(module), agree, p.divide_by)


TIES = MergeMethod("ties", ties, TiesParams, "TIES: trim, elect sign, disjoint mean; re-factored to `rank`")
DARE_LINEAR = MergeMethod("dare_linear", dare_linear, DareParams, "DARE drop-and-rescale, weighted sum")
DARE_TIES = MergeMethod("dare_ties", dare_ties, DareTiesParams, "DARE drop-and-rescale, then TIES sign election")
MAGNITUDE_PRUNE = MergeMethod("magnitude_prune", magnitude_prune, PruneParams, "top-density by magnitude, weighted sum")
BREADCRUMBS = MergeMethod("breadcrumbs", breadcrumbs, BreadcrumbsParams, "drop outliers (gamma) and small entries, weighted sum")
DELLA = MergeMethod("della", della, DellaParams, "magnitude-ranked random drop, rescale, TIES sign election")
