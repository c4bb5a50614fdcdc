"""`merge_cost` against what each merge really produces: its rank and bytes bound the output of
every method that needs no examples (equal where the rank is fixed by the rule), and its dense
work counts the ΔW values an elementwise method forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_fusion import METHODS, load_adapter, merge
from adapter_fusion.merge.cost import FLOAT32_BYTES, merge_cost

NO_DATA = [name for name, method in METHODS.items() if method.data is None]
CASES = [(m, r) for m in NO_DATA for r in (None, 2, 10_000) if r is None or METHODS[m].default_rank != "keep"]  # cat, factor_linear take no rank
PARAMS = {"slerp": {"t": 0.3}}


def _sources(tiny_adapters: list[Path], method: str):
    adapters = [load_adapter(path) for path in tiny_adapters]
    return adapters[:2] if METHODS[method].sources == 2 else adapters[:3] if method != "factor_linear" else [adapters[0], adapters[0]]


@pytest.mark.parametrize("method, rank", CASES)
def test_the_estimate_bounds_every_output(tiny_adapters: list[Path], method: str, rank: int | None) -> None:
    sources = _sources(tiny_adapters, method)
    cost = merge_cost(sources, METHODS[method], rank)
    out = merge(sources, method, parameters=PARAMS.get(method), rank=rank).adapter
    ranks = [delta.rank for delta in out.modules.values()]
    assert max(ranks) <= cost.max_rank
    assert sum((o + i) * delta.rank for delta in out.modules.values() for o, i in [delta.shape]) * FLOAT32_BYTES <= cost.output_bytes
    if method == "cat" or rank == 2:
        assert max(ranks) == cost.max_rank  # where the rule fixes the rank, the estimate is exact
    paths = set().union(*(a.modules for a in sources))
    shapes = {p: a.modules[p].shape for a in sources for p in a.modules}
    expected_dense = len(sources) * sum(shapes[p][0] * shapes[p][1] for p in paths) if METHODS[method].dense else 0
    assert cost.dense_values == expected_dense


def test_dense_work_counts_sources_that_lack_a_module(tiny_adapters: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An elementwise method forms zeros for a source without the module: counted, as the merge does it.
    The values formed are counted from the primitives themselves (every block of rows of every source)."""
    from adapter_fusion.merge.method_types import ModuleSources

    full, qv = load_adapter(tiny_adapters[0]), load_adapter(tiny_adapters[3])  # all projections; q and v only
    formed = []
    original = ModuleSources.dense_rows
    monkeypatch.setattr(ModuleSources, "dense_rows", lambda self, source, rows: formed.append((rows.stop - rows.start) * self.shape[1]) or original(self, source, rows))
    merge([full, qv, qv], "magnitude_prune", parameters={"density": 0.5})
    cost = merge_cost([full, qv, qv], METHODS["magnitude_prune"], None)
    assert cost.dense_values <= sum(formed) and cost.dense_values == 3 * sum(o * i for o, i in full.shapes.values())


def test_copies_of_one_adapter_count_once_each(tiny_adapters: list[Path]) -> None:
    """The amplification a recipe can ask for: n copies of one adapter cost n times its columns."""
    adapter = load_adapter(tiny_adapters[0])
    one, many = merge_cost([adapter], METHODS["cat"], None), merge_cost([adapter] * 50, METHODS["cat"], None)
    assert many.output_bytes == 50 * one.output_bytes == 50 * adapter.size_bytes
    assert merge_cost([adapter] * 50, METHODS["ties"], None).dense_values == 50 * merge_cost([adapter], METHODS["ties"], None).dense_values
