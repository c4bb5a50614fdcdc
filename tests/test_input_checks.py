"""Bad numbers and bad config values are refused with a typed error that names them, before any
arithmetic sees them (a NaN weight once reached a LinAlgError; a NaN alpha loaded and silently
generated nothing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapter_fusion import load_adapter, merge
from adapter_fusion.errors import AdapterFormatError, RecipeError
from adapter_fusion.lorahub import SearchSettings
from adapter_fusion.recipe import parse_recipe

BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e308]


@pytest.mark.parametrize("weight", BAD_NUMBERS)
def test_recipe_weights_must_be_finite_and_sane(weight: float) -> None:
    with pytest.raises(RecipeError, match="weight of source 1"):
        parse_recipe({"method": "linear", "sources": [{"adapter": "a"}, {"adapter": "b", "weight": weight}]})


@pytest.mark.parametrize("weight", BAD_NUMBERS)
def test_merge_weights_must_be_finite_and_sane(tiny_adapters: list[Path], weight: float) -> None:
    sources = [load_adapter(p) for p in tiny_adapters[:2]]
    with pytest.raises(RecipeError, match="finite"):
        merge(sources, "svd", [1.0, weight], rank=4)


@pytest.mark.parametrize(("method", "key"), [("della", "lambda"), ("ties", "density"), ("slerp", "t"), ("breadcrumbs", "gamma")])
def test_method_parameters_must_be_finite(method: str, key: str) -> None:
    with pytest.raises(RecipeError, match="finite number"):
        parse_recipe({"method": method, "sources": [{"adapter": "a"}, {"adapter": "b"}], "parameters": {key: float("nan")}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"l1": float("nan")}, "l1 must be"),
        ({"l1": -1.0}, "l1 must be"),
        ({"bound": float("inf")}, "bound must be"),
        ({"parallel": 10**9}, "parallel must be in"),
        ({"parallel": 50, "budget": 40}, "at most the budget"),
    ],
)
def test_lorahub_settings_are_checked_before_any_work(settings: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        SearchSettings(**{"budget": 40, "optimizer": "NGOpt", **settings})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": "eight"}, "r must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 4.5}, "r must be a positive integer"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number"),
        ({"lora_alpha": "sixteen"}, "lora_alpha must be"),
        ({"lora_alpha": True}, "lora_alpha must be"),
        ({"rank_pattern": {"q_proj(": 4}}, "not a valid regular expression"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a mapping"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern"),
    ],
)
def test_adapter_config_values_are_checked(tiny_adapters: list[Path], tmp_path: Path, change: dict, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters[0], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, **change}))  # json writes NaN/Infinity as Python does
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(broken)
