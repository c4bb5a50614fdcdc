"""What a merge method is: the types every method file shares.

A method combines one module's source deltas at a time. It returns either a `LowRankDelta`
(exact methods; the merge then truncates it without ever forming ΔW) or a dense (out, in)
tensor (elementwise methods; re-factored to the requested rank).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from adapter_fusion.delta import LowRankDelta


class Params(BaseModel):
    """Base of every method's parameters: unknown keys and NaN/inf values are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


@dataclass(frozen=True)
class ModuleSources:
    """One module across the sources; `deltas[i]` is None where source i lacks the module."""

    path: str
    shape: tuple[int, int]  # (out, in)
    deltas: list[LowRankDelta | None]
    weights: list[float]
    seed: int
    # data-aware methods only: per source, what its examples say about this module (see
    # `MergeMethod.data`); None for every other method
    statistics: list[Tensor] | None = None

    def dense_stack(self) -> Tensor:
        """(n_sources, out, in), zeros for missing sources."""
        return torch.stack([d.dense() if d is not None else torch.zeros(self.shape) for d in self.deltas])

    def row_blocks(self, rows: int = 128) -> Iterator[slice]:
        """Row ranges small enough that a block of every source's ΔW stays in cache."""
        return (slice(start, min(start + rows, self.shape[0])) for start in range(0, self.shape[0], rows))

    def dense_rows(self, source: int, rows: slice) -> Tensor:
        """Rows of source `source`'s ΔW, (len(rows), in), recomputed from the factors (cheap)."""
        delta = self.deltas[source]
        if delta is None:
            return torch.zeros(rows.stop - rows.start, self.shape[1])
        return delta.B[rows] @ delta.A

    def present(self) -> list[tuple[LowRankDelta, float]]:
        return [(d, w) for d, w in zip(self.deltas, self.weights) if d is not None]

    def generator(self, source: int) -> torch.Generator:
        """A generator that depends only on (seed, module, source): reproducible in any order."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.path}/{source}".encode()))


Combine = Callable[[ModuleSources, Params], "LowRankDelta | Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    combine: Combine
    params: type[Params]
    summary: str
    # What an omitted rank means: "exact" = the exact numerical rank, "max" = the largest source
    # rank (PEFT's svd default), "keep" = no re-factoring at all (cat, factor_linear).
    default_rank: Literal["exact", "max", "keep"] = "max"
    sources: int | None = None  # exact number of sources required, None = any
    dense: bool = False  # combines each module's dense ΔWᵢ (elementwise rules): its work grows with out × in × sources
    # what a data-aware method needs per module and source, collected by `adapter_fusion.data_merge`
    # from each source's examples: "gram" = mean x xᵀ of the module's inputs (in, in), "fisher" =
    # mean squared per-example gradient of the target log-likelihood w.r.t. ΔW (out, in);
    # "coefficients" = the fitted coefficient of each source (a 0-d tensor), from one shared set of examples
    data: Literal["gram", "fisher", "coefficients"] | None = None
