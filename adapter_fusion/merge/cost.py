"""What a merge will cost, from its sources' shapes alone, so a server can refuse it before any
arithmetic: the output's rank and bytes, and the dense work of elementwise methods.

Per module of shape (out, in) with source ranks r_i (sources lacking it add nothing):
- output rank: `cat` keeps Σ r_i; `factor_linear` keeps the common r; an exact method gives at most
  min(Σ r_i, out, in), or the rank asked for if smaller; a "max" method gives the asked rank or
  max r_i, at most min(out, in) (a low-rank result also at most Σ r_i);
- output bytes: (out + in) · rank float32 values (the factors as served and stored);
- dense work: an elementwise method (`MergeMethod.dense`) forms every source's ΔW of a module,
  zeros where a source lacks it, n · out · in values per module, one module at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adapter_fusion.adapters import Adapter
from adapter_fusion.merge.method_types import MergeMethod

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class MergeCost:
    max_rank: int  # the largest output rank of any module
    output_bytes: int  # the output's factors, float32
    dense_values: int  # source ΔW values an elementwise method forms, all modules together (0: low rank)


def _module_rank(method: MergeMethod, rank: int | None, ranks: list[int], shape: tuple[int, int]) -> int:
    full = min(shape)
    if method.default_rank == "keep":
        return sum(ranks) if method.name == "cat" else max(ranks)
    if method.default_rank == "exact":
        bound = min(sum(ranks), full)
        return bound if rank is None else min(rank, bound)
    wanted = max(ranks) if rank is None else rank
    return min(wanted, full if method.dense else min(sum(ranks), full))


def merge_cost(sources: Sequence[Adapter], method: MergeMethod, rank: int | None) -> MergeCost:
    """The cost of merging `sources` (the same adapter may appear many times) with `method`."""
    paths = sorted(set().union(*(a.modules for a in sources)))
    max_rank = output_bytes = dense_values = 0
    for path in paths:
        present = [a.modules[path] for a in sources if path in a.modules]
        out, inner = present[0].shape
        module_rank = _module_rank(method, rank, [d.rank for d in present], (out, inner))
        max_rank = max(max_rank, module_rank)
        output_bytes += (out + inner) * module_rank * FLOAT32_BYTES
        if method.dense:
            dense_values += len(sources) * out * inner  # sources lacking the module are zeros, formed all the same
    return MergeCost(max_rank, output_bytes, dense_values)
