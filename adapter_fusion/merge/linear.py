"""Weighted sums of adapters, exact in low rank: linear / task_arithmetic, cat, svd.

Σ w_i·B_i A_i is the product [w_1 B_1 … w_n B_n] @ [A_1; …; A_n]: these methods only
concatenate factors; the merge truncates the result exactly (QR + small SVD, never dense).
Negative weights subtract a task (task arithmetic's negation).
"""

from __future__ import annotations

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params


class NoParams(Params):
    pass


def weighted_concat(module: ModuleSources, params: Params) -> LowRankDelta:
    """The exact Σ w_i ΔW_i, rank Σ r_i (sources lacking the module add nothing)."""
    present = module.present()
    if not present:
        return LowRankDelta.zeros(module.shape)
    return LowRankDelta.concat([delta.scaled(weight) for delta, weight in present])


LINEAR = MergeMethod(
    "linear",
    weighted_concat,
    NoParams,
    "Σ w·ΔW, exact; truncated to `rank` if given, else kept at its exact numerical rank",
    default_rank="exact",
)
TASK_ARITHMETIC = MergeMethod(
    "task_arithmetic",
    weighted_concat,
    NoParams,
    "same as linear (negative weights remove a task)",
    default_rank="exact",
)
CAT = MergeMethod(
    "cat",
    weighted_concat,
    NoParams,
    "Σ w·ΔW as concatenated factors, rank Σr, no re-factoring (PEFT's `cat`)",
    default_rank="keep",
)
SVD = MergeMethod(
    "svd",
    weighted_concat,
    NoParams,
    "Σ w·ΔW truncated to `rank` (default: the largest source rank), exact low-rank SVD (PEFT's `svd`)",
    default_rank="max",
)
