"""The merge recipe: YAML (or a dict) validated by pydantic against the method registry.

Unknown keys and unknown methods are errors that name the key and list the valid ones; method
parameters are checked by the method's own parameter model when the recipe is parsed, before
any adapter is read. Relative adapter, examples, base and output paths resolve against the
recipe's folder. Reading a recipe file (ours or mergekit's) and running it: `adapter_fusion.recipe_run`.

Data-aware methods take examples (a JSONL file of input/target, or the pairs inline): regmean and
fisher one set per source (`sources[i].examples`), learned one shared set (top-level `examples`);
and `base` (the model the examples run through; default: the default base model). Over gRPC a
recipe carries no paths (the server never reads a client's path): examples come inline and the
base is the server's own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapter_fusion.errors import RecipeError
from adapter_fusion.merge import get_method, parse_parameters
from adapter_fusion.merge.driver import check_weights
from adapter_fusion.merge.methods import data_methods


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str
    target: str


Examples = str | Annotated[list[Example], Field(min_length=1)]  # a JSONL file of {"input", "target"}, or the pairs inline


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str  # a PEFT adapter dir (or, over gRPC, the name of a loaded adapter)
    weight: float = 1.0
    examples: Examples | None = None  # this source's data (regmean, fisher)


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
    examples: Examples | None = None  # shared by all sources (learned)
    base: str | None = None  # model dir the examples run through (data-aware methods); default: the default base
    chat: bool = True  # examples' inputs as chat user messages (the base tokenizer's template); false: raw text

    @model_validator(mode="after")
    def _method_and_parameters(self) -> Recipe:
        method = get_method(self.method)  # RecipeError lists the valid methods
        parse_parameters(method, self.parameters)
        check_weights(self.weights)
        _check_data(self, method.data)
        return self

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


def _check_data(recipe: Recipe, data: str | None) -> None:
    """Examples and a base exactly where the method learns from data: per source for regmean and
    fisher, one shared file for learned."""
    shared = data == "coefficients"
    for i, source in enumerate(recipe.sources):
        if data is not None and not shared and not source.examples:
            raise RecipeError(
                f"sources.{i}.examples: method {recipe.method!r} learns from each source's examples; give a JSONL file of "
                '{"input": ..., "target": ...} per source, or the pairs inline (over gRPC: the Source message\'s examples)'
            )
        if source.examples and data is None:
            raise RecipeError(f"sources.{i}.examples: method {recipe.method!r} uses no examples (only {', '.join(data_methods())} do)")
        if source.examples and shared:
            raise RecipeError(f"sources.{i}.examples: method {recipe.method!r} takes one shared top-level `examples`, not one set per source")
    if shared and not recipe.examples:
        raise RecipeError(
            f"examples: method {recipe.method!r} fits its coefficients on examples; give a JSONL file of "
            '{"input": ..., "target": ...}, or the pairs inline (over gRPC: the Recipe message\'s examples)'
        )
    if recipe.examples and not shared:
        raise RecipeError(f"examples: method {recipe.method!r} takes no shared examples (only learned does)")
    if data is None and recipe.base:
        raise RecipeError(f"base: method {recipe.method!r} runs no model (only {', '.join(data_methods())} do)")


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in error.errors():
        loc = list(e["loc"])
        if "examples" in loc and len(loc) > loc.index("examples") + 1:  # `examples` is a path or a list of pairs
            member = loc.pop(loc.index("examples") + 1)  # pydantic names the union member it tried
            if member == "str" and not isinstance(e["input"], str):
                continue  # not a path: the list's error says what is wrong
        where = ".".join(map(str, loc)) or "recipe"
        if e["type"] == "extra_forbidden":
            owner = Example if "examples" in loc else Source if "sources" in loc else model
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
