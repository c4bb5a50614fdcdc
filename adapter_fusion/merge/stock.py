"""Model Stock (Jang et al. 2024) on adapter deltas, exactly in low rank, no data needed.

Per module, with k sources: cos θ from the sources' pairwise angles, t = k·cos θ / (1 + (k−1)·cos θ),
and ΔW = t · mean_i ΔW_i. The paper's base-anchored average w_H = t·w_avg + (1−t)·w_0 is exactly
this in delta space (w_0 is the base, ΔW = w − w_0), so nothing is lost by working on adapters.

Cosines need only inner products ⟨B_i A_i, B_j A_j⟩ = Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ) (r_i×r_j Gram
matrices), and the result is the concatenation of the factors scaled by t/k: no dense matrix.
With `filter_wise`, each output row gets its own t (mergekit's option); row inner products are
diag(B_i (A_i A_jᵀ) B_jᵀ), still low rank, and the row scales fold into B.

mergekit (model_stock.py) averages the pairwise cosines; `average: angle` (the default) averages
the angles instead, as the issue states the method (θ = mean pairwise angle). The two agree when
all pairs share one angle, the paper's assumption. A source lacking a module counts as a zero
delta there (cos 0 with every other source), as in mergekit, where that model equals the base.
mergekit also clamps ‖ΔW_i‖·‖ΔW_j‖ below at 1e-6; we do not (only an exact 0 gives cos 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import RecipeError
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params


class ModelStockParams(Params):
    average: Literal["angle", "cosine"] = "angle"  # mean pairwise angle, or mergekit's mean cosine
    filter_wise: bool = False  # one ratio per output row (mergekit's filter_wise)


def _pairwise_inner(x: LowRankDelta, y: LowRankDelta, rows: bool) -> Tensor:
    """⟨x, y⟩ over the whole matrix (a 0-d tensor) or per output row ((out,)), float64."""
    if rows:
        return ((x.B.double() @ (x.A.double() @ y.A.double().T)) * y.B.double()).sum(dim=1)  # (out,)
    return ((x.B.double().T @ y.B.double()) * (x.A.double() @ y.A.double().T)).sum()


def stock_ratio(deltas: list[LowRankDelta], average: str, rows: bool) -> Tensor:
    """t = k·cos θ / (1 + (k−1)·cos θ), one value or one per row; float64."""
    k = len(deltas)
    norms = [_pairwise_inner(d, d, rows).clamp(min=0).sqrt() for d in deltas]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            product = norms[i] * norms[j]
            cos = torch.where(product > 0, _pairwise_inner(deltas[i], deltas[j], rows) / torch.where(product > 0, product, 1.0), 0.0)
            cosines.append(cos.clamp(-1.0, 1.0))
    stacked = torch.stack(cosines)  # (pairs,) or (pairs, out)
    cos = stacked.mean(dim=0) if average == "cosine" else stacked.acos().mean(dim=0).cos()
    denominator = 1 + (k - 1) * cos
    if bool((denominator <= 1e-12).any()):
        raise RecipeError(
            f"model_stock is undefined here: the sources' deltas point in opposite directions "
            f"(mean cos θ = {float(cos.min()):.3f} <= -1/(k-1) = {-1 / (k - 1):.3f}); use linear or ties"
        )
    return k * cos / denominator


def model_stock(module: ModuleSources, p: ModelStockParams) -> LowRankDelta:
    if any(w != 1.0 for w in module.weights):
        raise RecipeError("model_stock averages its sources equally with a ratio from their angles; leave the source weights at 1")
    if len(module.deltas) < 2:
        raise RecipeError(f"model_stock needs at least 2 sources (their angle sets the ratio), got {len(module.deltas)}")
    deltas = [d if d is not None else LowRankDelta.zeros(module.shape) for d in module.deltas]
    t = stock_ratio(deltas, p.average, p.filter_wise)  # () or (out,)
    scale = (t / len(deltas)).float()
    if not p.filter_wise:
        return LowRankDelta.concat([d.scaled(float(scale)) for d in deltas])
    return LowRankDelta.concat([LowRankDelta(d.B * scale[:, None], d.A) for d in deltas])  # row i of B times t_i/k


MODEL_STOCK = MergeMethod(
    "model_stock",
    model_stock,
    ModelStockParams,
    "Model Stock: t·mean ΔW, t from the sources' mean pairwise angle; exact in low rank, no data",
    default_rank="exact",
)
