"""A mergekit config read as one of our recipes, so that it means here what it means in mergekit.

Pure: a dict (the parsed YAML) in, a `Recipe` out; no file is read. Rules read from mergekit's
own source (merge_methods/generalized_task_arithmetic.py, linear.py, model_stock.py, sparsify.py):

- `models[].model` is an adapter directory (or mergekit's `base+adapter`, whose adapter part is
  taken). An entry naming `base_model` is the base itself: a zero delta. Task-arithmetic methods
  skip it, as mergekit does; `linear` counts its weight in the normalising sum.
- A tensor parameter (weight, density, gamma) comes from the model's `parameters`, else the
  top-level `parameters`, else mergekit's default. Per-layer lists and filters are refused.
- linear: Σ w·W / Σ w (`normalize`, default true) is W0 + Σ (w/Σw)·ΔW. Without normalize and
  Σw != 1, mergekit scales the base weights too, which no adapter can express: refused.
- task_arithmetic, dare_linear, breadcrumbs (no sign consensus): λ·Σ w·δ, divided by Σw when
  `normalize` (by 1 if |Σw| < 1e-8): folded into the weights, exact.
- ties, dare_ties (consensus "sum"): sign elected on w·δ, agreeing sum divided by the agreeing
  weights when `normalize` (ties: default true, dare_ties: false), by 1 where they sum to 0, times
  λ; DARE's `rescale` (default true) matches the L1 norm; ties with int(density·n) = 0 refused,
  as mergekit asserts. Per-model densities must be equal (ours is one per method).
- model_stock: mean pairwise cosine (mergekit's), `filter_wise` honoured; weights ignored.
- int8_mask only changes mergekit's mask dtype: accepted, no effect. `out_dtype` (else `dtype`)
  sets the saved dtype; we compute in float32. Our own `rank`, `seed`, `output`, `name` may sit
  at the top level (mergekit ignores them); results of elementwise methods are re-factored to
  `rank` (default: the largest source rank), and the merge reports what that kept.
"""

from __future__ import annotations

import math
from typing import Any

from adapter_fusion.errors import RecipeError
from adapter_fusion.recipe import Recipe, parse_recipe

# mergekit's global and per-model parameters of each method we translate, with its defaults
GLOBAL = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
    "ties": {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False},
    "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
    "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False},
    "breadcrumbs": {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
    "model_stock": {"filter_wise": False},
}
PER_MODEL = {
    "linear": {"weight": None},
    "task_arithmetic": {"weight": None, "density": 1.0},
    "ties": {"weight": None, "density": 1.0},
    "dare_ties": {"weight": None, "density": 1.0},
    "dare_linear": {"weight": None, "density": 1.0},
    "breadcrumbs": {"weight": None, "density": 1.0, "gamma": 0.01},
    "model_stock": {},
}
REFUSED_METHODS = {
    "slerp": "mergekit interpolates whole weights W0 + ΔW, which is not a low-rank update; use our `method: slerp` "
    "(it interpolates the adapters' deltas; `parallel_threshold: 5e-4` is mergekit's DOT_THRESHOLD)",
    "della": "mergekit ranks magnitudes per row, spreads keep probabilities over density±epsilon and rescales by L1; "
    "use our `method: della` (per-tensor ranks, density±epsilon/2, exact 1/p)",
    "della_linear": "see della; use our `method: della`",
}
REFUSED_KEYS = {
    "slices": "layer slicing builds a new architecture, not an adapter",
    "modules": "per-module definitions are not supported; give one `models` list",
    "tokenizer_source": "an adapter has no tokenizer of its own",
    "tokenizer": "an adapter has no tokenizer of its own",
    "chat_template": "an adapter has no chat template of its own",
}
OURS = ("rank", "seed", "output", "name")  # our keys, ignored by mergekit
TOP = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", *OURS)


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (list, dict)):
        raise RecipeError(f"{where}: per-layer values (lists, filters) are not supported; give one value")
    return value


def _number(value: Any, where: str) -> float:
    value = _scalar(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _adapter_path(model: Any, where: str) -> str:
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{where}: give the adapter directory as a string (or mergekit's 'base+adapter')")
    return model.split("+", 1)[1] if "+" in model else model


def _global(method: str, data: dict) -> dict[str, Any]:
    given = data.get("parameters") or {}
    if not isinstance(given, dict):
        raise RecipeError("parameters: expected a mapping of mergekit parameters")
    known = {**GLOBAL[method], **PER_MODEL[method]}
    for key in given:
        if key not in known:
            raise RecipeError(f"parameters.{key}: not a parameter of mergekit's {method} (known: {', '.join(known)})")
    return {key: _scalar(given.get(key, default), f"parameters.{key}") for key, default in GLOBAL[method].items()}


def _entries(method: str, data: dict) -> list[tuple[str, dict[str, Any], bool]]:
    """(adapter dir, its tensor parameters, whether it is the base) per `models` entry."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError("models: a mergekit config lists the adapters to merge under `models`")
    defaults = data.get("parameters") or {}
    entries = []
    for i, entry in enumerate(models):
        where = f"models.{i}"
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: each entry needs `model:` (an adapter directory)")
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise RecipeError(f"{where}.{sorted(unknown)[0]}: not supported (an entry has `model` and `parameters`)")
        given = entry.get("parameters") or {}
        for key in given:
            if key not in PER_MODEL[method]:
                raise RecipeError(f"{where}.parameters.{key}: not a per-model parameter of mergekit's {method} (known: {', '.join(PER_MODEL[method]) or 'none'})")
        is_base = data.get("base_model") is not None and entry["model"] == data["base_model"]
        values = {}
        for key, default in PER_MODEL[method].items():
            value = given.get(key, defaults.get(key, default))
            origin = f"{where}.parameters.{key}" if key in given or key not in defaults else f"parameters.{key}"
            if value is None and not is_base:
                raise RecipeError(f"{where}.parameters.{key}: required by mergekit's {method}")
            values[key] = None if value is None else _number(value, origin)
        entries.append((_adapter_path(entry["model"], f"{where}.model"), values, is_base))
    return entries


def _one(entries: list, key: str) -> float:
    values = sorted({values[key] for _, values, _ in entries})
    if len(values) > 1:
        raise RecipeError(f"models.*.parameters.{key}: must be equal across models here (got {values}); ours is one per method")
    return values[0]


def to_recipe(data: dict) -> Recipe:
    """The recipe that computes what mergekit computes for `data` (see the module docstring)."""
    for key in data:
        if key in REFUSED_KEYS:
            raise RecipeError(f"{key}: not supported ({REFUSED_KEYS[key]})")
        if key not in TOP:
            raise RecipeError(f"{key}: unknown mergekit key (supported: {', '.join(TOP)})")
    method = data.get("merge_method")
    if method in REFUSED_METHODS:
        raise RecipeError(f"merge_method {method}: not translated: {REFUSED_METHODS[method]}")
    if method not in GLOBAL:
        raise RecipeError(f"merge_method {method!r}: not supported; supported: {', '.join(GLOBAL)}")
    options = _global(method, data)
    every = _entries(method, data)
    entries = [e for e in every if not e[2]]
    if not entries:
        raise RecipeError("models: only the base model is listed; list the adapters to merge")
    weights = [values.get("weight") or 0.0 for _, values, _ in entries]
    parameters: dict[str, Any] = {}
    if method == "linear":
        total = sum(values["weight"] for _, values, _ in every if values["weight"] is not None)
        if options["normalize"]:
            if total == 0:
                raise RecipeError("linear: the weights sum to 0 and mergekit divides by their sum; fix the weights")
            weights = [w / total for w in weights]
        elif abs(total - 1.0) > 1e-6:
            raise RecipeError(f"linear with normalize: false scales the base model by Σ weight = {total:g}, which an adapter cannot express; set normalize: true or weights summing to 1")
    elif method == "model_stock":
        weights = [1.0] * len(entries)
        parameters = {"average": "cosine", "filter_wise": bool(options["filter_wise"])}
    else:
        if method in ("ties", "breadcrumbs") and options["rescale"]:
            raise RecipeError(f"parameters.rescale: mergekit's L1 rescale after {method}'s magnitude pruning is not supported; remove it")
        lam = _number(options["lambda"], "parameters.lambda")
        consensus = method in ("ties", "dare_ties")
        if not consensus:
            total = sum(weights)
            divisor = total if options["normalize"] and abs(total) >= 1e-8 else 1.0
            weights = [w * lam / divisor for w in weights]
        if method != "task_arithmetic":
            parameters["density"] = _one(entries, "density")
        if method == "breadcrumbs":
            parameters["gamma"] = _one(entries, "gamma")
        if method.startswith("dare"):
            parameters.update(rescale=bool(options["rescale"]), rescale_norm="l1")
        if consensus:
            parameters.update(
                majority_sign="total", sign_from="weighted", zero_divisor="one", divide_by="weights" if options["normalize"] else "none", **{"lambda": lam}
            )
        if method == "ties":
            parameters["on_empty"] = "error"
    recipe: dict[str, Any] = {
        "method": method,
        "sources": [{"adapter": path, "weight": w} for (path, _, _), w in zip(entries, weights)],
        "parameters": parameters,
        **{key: data[key] for key in OURS if key in data},
    }
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        recipe["dtype"] = str(dtype).removeprefix("torch.")
    return parse_recipe(recipe)
