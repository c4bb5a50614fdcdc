"""Fisher merging (Matena & Raffel 2022) of adapter deltas, with a diagonal Fisher.

F_s = E_examples[(∂ log p(target | input) / ∂ΔW)²] on source s's examples, one gradient per
example (`data_merge` collects it, the source's adapter applied). The merge is the
Fisher-weighted mean ΔW = Σ_s w_s F̃_s ⊙ ΔW_s / Σ_s w_s F̃_s, entry by entry, with
F̃ = max(F, fisher_floor) as in the paper's code: where no source's examples say anything about an
entry, the entries are averaged by the weights alone, and the denominator is never 0. The result
is dense per module, re-factored to the recipe's rank (default: the largest source rank).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params
from adapter_fusion.merge.regmean import positive_weights


class FisherParams(Params):
    fisher_floor: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6  # Matena & Raffel's default


def fisher(module: ModuleSources, p: FisherParams) -> Tensor:
    positive_weights(module, "fisher")
    numerator = torch.zeros(module.shape)  # (out, in)
    denominator = torch.zeros(module.shape)
    for delta, w, information in zip(module.deltas, module.weights, module.statistics):
        weighted = w * information.float().clamp(min=p.fisher_floor)  # (out, in)
        denominator += weighted
        if delta is not None:
            numerator += weighted * delta.dense()
    return numerator / denominator


FISHER = MergeMethod(
    "fisher",
    fisher,
    FisherParams,
    "Fisher merging: per-entry mean weighted by each source's diagonal Fisher on its examples (needs examples)",
    default_rank="max",
    data="fisher",
    dense=True,
)
