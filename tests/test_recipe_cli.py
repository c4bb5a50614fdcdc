"""Recipes (YAML, validated) and the `adapter-fusion` command, run for real in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adapter_fusion import load_adapter
from adapter_fusion.cli import app
from adapter_fusion.errors import RecipeError
from adapter_fusion.recipe import parse_recipe
from adapter_fusion.recipe_run import load_recipe

runner = CliRunner()


def write_recipe(tmp_path: Path, adapters: list[Path], **changes) -> Path:
    recipe = {
        "method": "ties",
        "sources": [{"adapter": str(adapters[0]), "weight": 0.6}, {"adapter": str(adapters[1]), "weight": 0.4}],
        "parameters": {"density": 0.3, "majority_sign": "total"},
        "rank": 4,
        "seed": 0,
        "output": "out/merged",
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_command_writes_a_peft_adapter(tiny_adapters: list[Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_adapters)
    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "ties of 2 adapters" in result.output
    out = tmp_path / "out" / "merged"  # relative to the recipe's folder
    assert set(load_adapter(out).ranks.values()) == {4}
    again = runner.invoke(app, ["merge", str(recipe)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(app, ["merge", str(recipe), "--overwrite"]).exit_code == 0
    other = runner.invoke(app, ["merge", str(recipe), "--output", str(tmp_path / "elsewhere")])
    assert other.exit_code == 0 and (tmp_path / "elsewhere" / "adapter_config.json").is_file()


def test_inspect_command(tiny_adapters: list[Path]) -> None:
    result = runner.invoke(app, ["inspect", str(tiny_adapters[2])])
    assert result.exit_code == 0, result.output
    for text in ("rank", "8", "rsLoRA", "q_proj", "tiny-llama"):
        assert text in result.output
    missing = runner.invoke(app, ["inspect", "/no/such/adapter"])
    assert missing.exit_code == 2 and "not a directory" in missing.output


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "tiess"}, "unknown method 'tiess'; valid methods: linear, task_arithmetic"),
        ({"ranks": 4}, "ranks: unknown key \\(valid keys: method, sources, parameters, rank"),
        ({"sources": [{"adapter": "x", "wieght": 1}]}, "sources.0.wieght: unknown key \\(valid keys: adapter, weight, examples\\)"),
        ({"parameters": {"density": 0.3, "sign": "total"}}, "sign: unknown parameter \\(valid parameters: density, majority_sign"),
        ({"parameters": {"majority_sign": "most"}}, "majority_sign: Input should be 'total' or 'frequency'"),
        ({"rank": 0}, "rank: Input should be greater than or equal to 1"),
        ({"sources": []}, "sources: List should have at least 1 item"),
    ],
)
def test_bad_recipes_name_the_key(tiny_adapters: list[Path], tmp_path: Path, changes: dict, message: str) -> None:
    recipe = write_recipe(tmp_path, tiny_adapters, **changes)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)
    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 2 and "error:" in result.output


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        parse_recipe(["linear"])


def test_missing_source_adapter_is_reported(tiny_adapters: list[Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, [tiny_adapters[0], tmp_path / "ghost"])
    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 2 and "ghost: not a directory" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
