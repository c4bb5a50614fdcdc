"""model_stock against Model Stock on dense deltas (tests/mergekit_formulas.stock_reference,
mergekit's ModelStockMergeTask with the base at 0), its identity and its refusals."""

from __future__ import annotations


import pytest

from adapter_fusion import merge
from adapter_fusion.errors import RecipeError
from tests.mergekit_formulas import stock_reference
from tests.test_merge_methods import check_against, raw, sources  # noqa: F401  (fixtures shared with the merge tests)


@pytest.mark.parametrize("average", ["angle", "cosine"])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_dense_formula(average, filter_wise, sources, raw) -> None:
    result = merge(sources, "model_stock", parameters={"average": average, "filter_wise": filter_wise})
    check_against(result, raw, lambda ts, _: stock_reference(ts, average, filter_wise))


def test_model_stock_of_one_adapter_twice_is_that_adapter(sources, raw) -> None:
    """cos θ = 1: t = k/(1 + k − 1) = 1, and the mean of one delta is itself."""
    check_against(merge([sources[0]] * 3, "model_stock"), raw[:1] * 3, lambda ts, _: ts[0])


def test_model_stock_refusals(sources) -> None:
    from adapter_fusion import Adapter

    with pytest.raises(RecipeError, match="model_stock averages its sources equally.*leave the source weights at 1"):
        merge(sources[:2], "model_stock", [0.5, 1.0])
    with pytest.raises(RecipeError, match="model_stock needs at least 2 sources"):
        merge(sources[:1], "model_stock")
    negated = Adapter("neg", {p: d.scaled(-1.0) for p, d in sources[0].modules.items()})
    with pytest.raises(RecipeError, match=r"opposite directions \(mean cos θ = -1.000 <= -1/\(k-1\) = -1.000\)"):
        merge([sources[0], negated], "model_stock", parameters={"average": "cosine"})
