"""SLERP between two adapters' deltas, per module, exactly in low rank.

Spherical interpolation of the flattened ΔW_0, ΔW_1 yields c_0·ΔW_0 + c_1·ΔW_1 with scalar
coefficients that depend only on their norms and inner product, and those come from the r×r
Gram matrices. So SLERP, like linear, is a concatenation of scaled factors: no dense matrix.

Parallel threshold: we fall back to lerp when |cos θ| > 1 − `parallel_threshold` (default 1e-6:
the angle is computed in float64 from exact Gram matrices, so only truly (anti)parallel deltas,
where sin θ loses every digit, need the fallback). mergekit's `slerp` lerps when |cos θ| >
DOT_THRESHOLD = 0.9995, the same strict test with `parallel_threshold: 5e-4`. Two differences
remain: mergekit leaves a vector unnormalised when its norm is <= 1e-8 (we lerp only when a norm
is exactly 0), and mergekit interpolates whole weights W0 + ΔW, not the deltas, which is not a
low-rank update at all; so its SLERP configs are not translated (see `adapter_fusion.mergekit`).
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field

from adapter_fusion.delta import LowRankDelta, inner
from adapter_fusion.errors import RecipeError
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params


class SlerpParams(Params):
    t: Annotated[float, Field(ge=0.0, le=1.0, description="0 = first source, 1 = second")] = 0.5
    parallel_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-6  # |cos θ| > 1 − this: lerp (mergekit: 5e-4)


def slerp_coefficients(x: LowRankDelta, y: LowRankDelta, t: float, threshold: float) -> tuple[float, float]:
    """(c0, c1) with slerp(x, y, t) = c0·x + c1·y, angle measured between the normalised deltas
    (mergekit's rule); falls back to lerp when either is zero or they are (anti)parallel."""
    nx, ny = inner(x, x) ** 0.5, inner(y, y) ** 0.5
    if nx == 0.0 or ny == 0.0:
        return 1.0 - t, t
    cos = inner(x, y) / (nx * ny)
    if abs(cos) > 1.0 - threshold:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(module: ModuleSources, p: SlerpParams) -> LowRankDelta:
    if any(w != 1.0 for w in module.weights):
        raise RecipeError("slerp interpolates with parameter t; leave the source weights at 1")
    x, y = (d if d is not None else LowRankDelta.zeros(module.shape) for d in module.deltas)
    c0, c1 = slerp_coefficients(x, y, p.t, p.parallel_threshold)
    return LowRankDelta.concat([x.scaled(c0), y.scaled(c1)])


SLERP = MergeMethod(
    "slerp",
    slerp,
    SlerpParams,
    "spherical interpolation of two deltas at t, exact in low rank",
    default_rank="exact",
    sources=2,
)
