"""`learned`: Σ cᵢΔWᵢ with coefficients fitted on examples (gradient-based LoraHub), exact in low
rank. The fitting runs the model (`adapter_fusion.coefficient_fit`); this rule only applies the fitted
coefficients, one per source and module (equal across modules when fitted `per: source`)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import Field

from adapter_fusion.delta import LowRankDelta
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params
from adapter_fusion.merge.linear import weighted_concat


class LearnedParams(Params):
    """A learned fit's settings, checked here only: a recipe's parameters, SearchWeights and
    `coefficient_fit` (`learned_settings`) all validate through this model."""

    per: Literal["source", "layer", "module"] = "source"  # one coefficient per source, per (block, source) or per (module, source)
    steps: Annotated[int, Field(ge=1, le=10_000)] = 30  # Adam steps
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    l1: Annotated[float, Field(ge=0.0, le=1e3)] = 0.05  # LoraHub's penalty on mean |c|
    bound: Annotated[float, Field(gt=0.0, le=1e3)] = 1.5  # coefficients clamped to ±bound, as LoraHub's search range
    batch_size: Annotated[int, Field(ge=1)] | None = None  # None: every example each step


def learned(module: ModuleSources, p: LearnedParams) -> LowRankDelta:
    """Linear's exact Σ w·ΔW with this module's fitted coefficients as the weights."""
    return weighted_concat(dataclasses.replace(module, weights=[float(c) for c in module.statistics]), p)


LEARNED = MergeMethod(
    "learned",
    learned,
    LearnedParams,
    "Σ c·ΔW, coefficients (per source, layer or module) fitted by Adam on a few examples from the recipe weights; exact",
    default_rank="exact",
    data="coefficients",
)
