"""RegMean (Jin et al. 2023) on adapter deltas: the merge that best reproduces each source's
module outputs on that source's own inputs.

For a linear module y = W x with inputs X_s (tokens × in) on source s's examples, RegMean solves
min_W Σ_s w_s‖X_s Wᵀ − X_s W_sᵀ‖², so W = (Σ_s w_s W_s G_s)(Σ_s w_s G_s)⁻¹ with G_s = X_sᵀX_s.
Every W_s is W_0 + ΔW_s with one base W_0, so the same holds for the deltas:
ΔW* = (Σ_s w_s ΔW_s G̃_s)(Σ_s w_s G̃_s)⁻¹. G̃ = α·G + (1−α)·diag(G) is the paper's shrinkage of
the off-diagonal (it keeps the sum invertible with few tokens; α = 1 is plain regression).

G_s here is the mean x xᵀ over source s's tokens (`data_merge` collects it), so a source's
influence is its weight, not how many tokens its examples have. And ΔW_s G̃_s M⁻¹ =
B_s (A_s G̃_s M⁻¹): the result is low rank (Σ r_s) without forming any out×in matrix; the merge
then truncates it exactly to the recipe's rank. A source lacking the module contributes ΔW_s = 0
(its outputs there are the base's) with its inputs' Gram matrix.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import RecipeError
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params


class RegMeanParams(Params):
    alpha: Annotated[float, Field(ge=0.0, le=1.0, description="off-diagonal scale of the Gram matrices")] = 0.9


def positive_weights(module: ModuleSources, method: str) -> None:
    """Data-aware weights weigh each source's evidence: a zero or negative one has no meaning."""
    bad = [i for i, w in enumerate(module.weights) if w <= 0]
    if bad:
        raise RecipeError(f"{method} weighs each source's examples: weights must be > 0, source {bad[0]} has {module.weights[bad[0]]!r}")


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α·G + (1−α)·diag(G): RegMean's reduction of the off-diagonal entries."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean(module: ModuleSources, p: RegMeanParams) -> LowRankDelta:
    positive_weights(module, "regmean")
    grams = [shrink(g.double(), p.alpha) for g in module.statistics]  # each (in, in)
    total = sum(w * g for w, g in zip(module.weights, grams))  # M = Σ w_s G̃_s, (in, in)
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        raise RecipeError(
            f"regmean: the input Gram matrices of module {module.path!r} sum to a singular matrix (some input "
            "direction never occurs in the examples); lower alpha (e.g. 0.9) or give more examples"
        )
    parts = []
    for delta, w, g in zip(module.deltas, module.weights, grams):
        if delta is None:
            continue
        A = torch.cholesky_solve(g @ delta.A.double().T, factor).T  # (A_s G̃_s M⁻¹) = (M⁻¹ G̃_s A_sᵀ)ᵀ, (r, in)
        parts.append(LowRankDelta(delta.B * w, A.float()))
    return LowRankDelta.concat(parts) if parts else LowRankDelta.zeros(module.shape)


REGMEAN = MergeMethod(
    "regmean",
    regmean,
    RegMeanParams,
    "RegMean: the delta that best reproduces each source's module outputs on its examples (needs examples); low rank, exact",
    default_rank="max",
    data="gram",
)
