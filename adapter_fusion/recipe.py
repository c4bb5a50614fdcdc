"""The merge recipe: YAML (or a dict) validated by pydantic against the method registry.

Unknown keys and unknown methods are errors that name the key and list the valid ones; method
parameters are checked by the method's own parameter model when the recipe is parsed, before
any adapter is read. Relative adapter and output paths resolve against the recipe's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapter_fusion.adapters import load_adapter, save_adapter
from adapter_fusion.errors import OutputExistsError, RecipeError
from adapter_fusion.merge import MergeResult, get_method, merge, parse_parameters
from adapter_fusion.merge.driver import ProgressCallback, check_weights


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str  # a PEFT adapter dir (or, over gRPC, the name of a loaded adapter)
    weight: float = 1.0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    sources: Annotated[list[Source], Field(min_length=1)]
    parameters: dict[str, Any] = {}
    rank: Annotated[int, Field(ge=1)] | None = None  # omitted: the method's default
    seed: int = 0
    output: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    name: str | None = None

    @model_validator(mode="after")
    def _method_and_parameters(self) -> Recipe:
        method = get_method(self.method)  # RecipeError lists the valid methods
        parse_parameters(method, self.parameters)
        check_weights(self.weights)
        return self

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(map(str, e["loc"])) or "recipe"
        if e["type"] == "extra_forbidden":
            owner = Source if "sources" in e["loc"] else model
            lines.append(f"{where}: unknown key (valid keys: {', '.join(owner.model_fields)})")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key missing")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def parse_recipe(data: dict | Recipe) -> Recipe:
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        cause = next((e.get("ctx", {}).get("error") for e in error.errors() if e["type"] == "value_error"), None)
        if isinstance(cause, RecipeError):  # raised by the registry inside a validator: keep its text
            raise cause from None
        raise RecipeError(f"invalid recipe: {_describe(error, Recipe)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; relative paths in it are taken from the recipe's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    try:
        recipe = parse_recipe(data)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
    base = path.parent

    def resolve(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else base / p)

    sources = [s.model_copy(update={"adapter": resolve(s.adapter)}) for s in recipe.sources]
    output = resolve(recipe.output) if recipe.output else None
    return recipe.model_copy(update={"sources": sources, "output": output})


def run_recipe(recipe: Recipe, on_module: ProgressCallback | None = None, allow_pickle: bool = False) -> MergeResult:
    """Load the recipe's source adapters (paths) and merge them."""
    adapters = [load_adapter(s.adapter, allow_pickle=allow_pickle) for s in recipe.sources]
    name = recipe.name or (Path(recipe.output).name if recipe.output else "merged")
    return merge(
        adapters,
        method=recipe.method,
        weights=recipe.weights,
        parameters=recipe.parameters,
        rank=recipe.rank,
        seed=recipe.seed,
        name=name,
        on_module=on_module,
    )


def merge_to_disk(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, on_module: ProgressCallback | None = None) -> tuple[MergeResult, Path]:
    """Run a recipe and save the result (atomically) to `output` or the recipe's output."""
    target = output or recipe.output
    if target is None:
        raise RecipeError("no output: set `output:` in the recipe or pass --output")
    if Path(target).exists() and not overwrite:  # fail before the work, not after it
        raise OutputExistsError(f"{target} already exists; choose another output or pass --overwrite")
    result = run_recipe(recipe, on_module=on_module)
    path = save_adapter(result.adapter, target, dtype=recipe.dtype, overwrite=overwrite)
    return result, path
