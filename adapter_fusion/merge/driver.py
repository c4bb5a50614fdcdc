"""Run a merge method over every module of the sources, one module at a time; low-rank results
are truncated in batches of modules (`delta.truncate_all`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

import torch
from torch import Tensor

from adapter_fusion.adapters import Adapter, check_compatible
from adapter_fusion.delta import LowRankDelta, Truncation, truncate_all
from adapter_fusion.errors import RecipeError
from adapter_fusion.merge.method_types import MergeMethod, ModuleSources, Params
from adapter_fusion.merge.methods import get_method, parse_parameters


PENDING_BYTES = 16 << 20  # low-rank results held for one batched truncation; its float64 working set is ~8x this


@dataclass(frozen=True)
class ModuleReport:
    """What the output kept of one module: its rank, and the energy and error of re-factoring."""

    path: str
    rank: int
    energy_kept: float
    relative_error: float


@dataclass
class MergeResult:
    adapter: Adapter
    report: list[ModuleReport]

    def summary(self) -> dict[str, float]:
        """Worst and mean figures over modules, for a one-line account of a merge."""
        n = max(len(self.report), 1)
        return {
            "modules": len(self.report),
            "max_rank": max((m.rank for m in self.report), default=0),
            "min_energy_kept": min((m.energy_kept for m in self.report), default=1.0),
            "mean_energy_kept": sum(m.energy_kept for m in self.report) / n,
            "max_relative_error": max((m.relative_error for m in self.report), default=0.0),
        }


ProgressCallback = Callable[[int, int, str], None]  # (done, total, module path)

# Past this, Σ wᵢΔWᵢ of fp32 factors overflows or loses every digit of the smaller terms; no
# composition needs it (task arithmetic uses |w| <= a few).
MAX_ABS_WEIGHT = 1e4


def check_weights(weights: Sequence[float]) -> None:
    """Refuse NaN, infinite and absurd weights before any arithmetic sees them."""
    for i, w in enumerate(weights):
        if not math.isfinite(w) or abs(w) > MAX_ABS_WEIGHT:
            raise RecipeError(f"weight of source {i} is {w!r}; weights must be finite and within ±{MAX_ABS_WEIGHT:g}")


def _statistics_of(statistics: dict[str, list[Tensor]], path: str, n: int) -> list[Tensor]:
    stats = statistics.get(path)
    if stats is None or len(stats) != n:
        raise RecipeError(f"statistics for module {path!r} are missing or not one per source ({n} sources)")
    return stats


def _target_rank(method: MergeMethod, rank: int | None, sources: list[Adapter], path: str) -> int | None:
    """The rank to re-factor one module to; None means exact (low-rank) or untouched."""
    if rank is not None or method.default_rank in ("exact", "keep"):
        return rank
    return max(a.modules[path].rank for a in sources if path in a.modules)


def _finish(method: MergeMethod, combined: LowRankDelta | Tensor, rank: int | None, seed: int, path: str) -> tuple[LowRankDelta, Truncation] | int | None:
    """One module's result, or, for a low-rank result still to be truncated, the rank to
    truncate it to (the caller truncates such modules together: `delta.truncate_all`)."""
    parts = [combined] if isinstance(combined, Tensor) else [combined.A, combined.B]
    if not all(bool(torch.isfinite(p).all()) for p in parts):  # e.g. DARE's 1/density at a tiny density
        raise RecipeError(f"method {method.name!r} overflows float32 on module {path!r}; use a larger density or smaller weights")
    if isinstance(combined, Tensor):
        if rank is None:  # only reachable for dense methods declared "exact": refuse, do not guess
            raise RecipeError(f"method {method.name!r} produces a dense update: give a rank")
        return LowRankDelta.from_dense(combined, rank, seed=seed)
    if method.default_rank == "keep" and rank is None:
        return combined, Truncation(combined.rank, 1.0, 0.0)
    return rank


def merge(
    sources: Sequence[Adapter],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    parameters: dict | Params | None = None,
    rank: int | None = None,
    seed: int = 0,
    name: str = "merged",
    on_module: ProgressCallback | None = None,
    statistics: dict[str, list[Tensor]] | None = None,
) -> MergeResult:
    """Compose `sources` with `method`, module by module; see `adapter_fusion.METHODS`.

    `rank` is the output rank (omitted: the method's default, see each method's summary);
    `weights` default to 1 each. Peak memory is one module's dense deltas for elementwise
    methods, and only factors for the low-rank ones (those awaiting truncation: PENDING_BYTES,
    and ~8x that while a batch is truncated). `on_module` reports each module once its result is
    final. `statistics` ({module: one tensor per
    source}) feeds the data-aware methods; `adapter_fusion.data_merge` collects it from examples.
    """
    spec = get_method(method)
    params = parse_parameters(spec, parameters)
    sources = list(sources)
    if not sources:
        raise RecipeError("a merge needs at least one source adapter")
    if spec.sources is not None and len(sources) != spec.sources:
        raise RecipeError(f"method {method!r} takes exactly {spec.sources} sources, got {len(sources)}")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise RecipeError(f"got {len(weights)} weights for {len(sources)} sources")
    check_weights(weights)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise RecipeError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and method == "cat":
        raise RecipeError("cat keeps every source's rank (Σr); use svd or linear to choose a rank")
    check_compatible(sources)
    if spec.data is not None and statistics is None:
        raise RecipeError(
            f"method {method!r} learns from data: give it examples (JSONL files of input/target) in a recipe, or call "
            "adapter_fusion.data_merge.merge_with_data (regmean, fisher) or adapter_fusion.coefficient_fit.merge_learned (learned)"
        )

    paths = sorted(set().union(*(a.modules for a in sources)))
    shapes = {path: a.modules[path].shape for a in sources for path in a.modules}
    finished: dict[str, tuple[LowRankDelta, Truncation]] = {}
    pending: dict[str, tuple[LowRankDelta, int | None]] = {}  # low-rank results, truncated together
    held = 0  # bytes in `pending`
    for done, path in enumerate(paths):
        stats = None if spec.data is None else _statistics_of(statistics, path, len(sources))
        group = ModuleSources(path, shapes[path], [a.modules.get(path) for a in sources], weights, seed, stats)
        combined = spec.combine(group, params)
        outcome = _finish(spec, combined, _target_rank(spec, rank, sources, path), seed, path)
        if isinstance(outcome, tuple):
            ready = {path: outcome}
        else:
            pending[path] = combined, outcome
            held += combined.B.nbytes + combined.A.nbytes
            ready = {}
        if held >= PENDING_BYTES or done == len(paths) - 1:
            ready |= zip(pending, truncate_all([d for d, _ in pending.values()], [r for _, r in pending.values()]))
            pending, held = {}, 0
        for final in ready:
            finished[final] = ready[final]
            if on_module is not None:
                on_module(len(finished), len(paths), final)
    modules = {path: finished[path][0] for path in paths}
    report = [ModuleReport(path, *astuple(finished[path][1])) for path in paths]

    first = sources[0]
    recipe = {
        "method": method,
        "sources": [{"adapter": a.source or a.name, "weight": w} for a, w in zip(sources, weights)],
        "parameters": params.model_dump(by_alias=True),
        "rank": rank,
        "seed": seed,
    }
    adapter = Adapter(
        name=name,
        modules=modules,
        base_model=next((a.base_model for a in sources if a.base_model), None),
        task_type=first.task_type,
        fan_in_fan_out=first.fan_in_fan_out,
        extra={"recipe": recipe},
    )
    return MergeResult(adapter, report)

