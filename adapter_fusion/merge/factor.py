"""`factor_linear`: weighted sums of the A and B factors separately, (Σ w·B)(Σ w·A).

This is not the weighted sum of the deltas (it adds cross terms B_i A_j), and exists only for
parity: it is LoraHub's original composition rule, and with `weight_split: sqrt` it is PEFT's
`linear` combination ((Σ √|w|·B)(Σ sign(w)√|w|·A)). All sources must have the same rank.
"""

from __future__ import annotations

import math
from typing import Literal

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.errors import IncompatibleAdaptersError
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params


class FactorLinearParams(Params):
    weight_split: Literal["lorahub", "sqrt"] = "lorahub"  # w on both factors, or PEFT's √|w| split


def factor_linear(module: ModuleSources, p: FactorLinearParams) -> LowRankDelta:
    present = module.present()
    ranks = {delta.rank for delta, _ in present}
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(
            f"factor_linear needs equal ranks, module {module.path!r} has ranks {sorted(ranks)}; use linear or svd"
        )
    if not present:
        return LowRankDelta.zeros(module.shape)
    if p.weight_split == "lorahub":
        b_weights = a_weights = [w for _, w in present]
    else:
        b_weights = [math.sqrt(abs(w)) for _, w in present]
        a_weights = [math.copysign(math.sqrt(abs(w)), w) for _, w in present]
    B = sum(w * delta.B for (delta, _), w in zip(present, b_weights))
    A = sum(w * delta.A for (delta, _), w in zip(present, a_weights))
    return LowRankDelta(B, A)


FACTOR_LINEAR = MergeMethod(
    "factor_linear",
    factor_linear,
    FactorLinearParams,
    "(Σ w·B)(Σ w·A): LoraHub's original rule (equal ranks), or PEFT's `linear` with weight_split sqrt",
    default_rank="keep",
)
