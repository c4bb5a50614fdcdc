"""The one explicit table of merge methods, and parameter validation against it."""

from __future__ import annotations

from pydantic import ValidationError

from adapter_fusion.errors import RecipeError
from adapter_fusion.merge import factor, fisher, learned, linear, regmean, slerp, sparse, stock
from adapter_fusion.merge.method_types import MergeMethod, Params

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        linear.LINEAR,
        linear.TASK_ARITHMETIC,
        linear.CAT,
        linear.SVD,
        sparse.TIES,
        sparse.DARE_LINEAR,
        sparse.DARE_TIES,
        sparse.MAGNITUDE_PRUNE,
        sparse.BREADCRUMBS,
        sparse.DELLA,
        slerp.SLERP,
        factor.FACTOR_LINEAR,
        stock.MODEL_STOCK,
        regmean.REGMEAN,
        fisher.FISHER,
        learned.LEARNED,
    ]
}


def data_methods() -> list[str]:
    """The methods that learn from examples (they need `statistics`)."""
    return [m.name for m in METHODS.values() if m.data is not None]


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def parse_parameters(method: MergeMethod, parameters: dict | Params | None) -> Params:
    """Validate raw parameters against the method's model; errors name the key and the valid ones."""
    if isinstance(parameters, method.params):
        return parameters
    try:
        return method.params.model_validate(dict(parameters or {}))
    except ValidationError as error:
        valid = ", ".join(method.params.model_fields) or "(none)"
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'parameters'}: "
            + ("unknown parameter" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, "))
            for e in error.errors()
        )
        raise RecipeError(f"bad parameters for method {method.name!r}: {problems} (valid parameters: {valid})") from None
