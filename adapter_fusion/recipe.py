"""The merge recipe: YAML (or a dict) validated by pydantic against the method registry.

Unknown keys and unknown methods are errors that name the key and list the valid ones; method
parameters are checked by the method's own parameter model when the recipe is parsed, before
any adapter is read. Relative adapter, examples, base and output paths resolve against the
recipe's folder. A mergekit config (it has `merge_method`) is read too, through
`adapter_fusion.mergekit`.

Data-aware methods take examples (a JSONL file of input/target, or the pairs inline): regmean and
fisher one set per source (`sources[i].examples`), learned one shared set (top-level `examples`);
and `base` (the model the examples run through; default: the default base model). Over gRPC a
recipe carries no paths (the server never reads a client's path): examples come inline and the
base is the server's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapter_fusion.adapters import Adapter, load_adapter, save_adapter
from adapter_fusion.errors import OutputExistsError, RecipeError
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.merge import MergeResult, get_method, merge, parse_parameters
from adapter_fusion.merge.driver import ProgressCallback, check_weights
from adapter_fusion.merge.registry import data_methods


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
        if isinstance(data, dict) and "merge_method" in data:
            from adapter_fusion.mergekit import to_recipe

            recipe = to_recipe(data)
        else:
            recipe = parse_recipe(data)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
    folder = path.parent

    def resolve(p):
        return str(Path(p) if Path(p).is_absolute() else folder / p) if isinstance(p, str) else p  # inline examples stay

    sources = [s.model_copy(update={"adapter": resolve(s.adapter), "examples": resolve(s.examples)}) for s in recipe.sources]
    paths = {key: resolve(getattr(recipe, key)) for key in ("output", "base", "examples")}
    return recipe.model_copy(update={"sources": sources, **paths})


def read_examples(examples: str | list[Example]) -> list[tuple[str, str]]:
    """(input, target) pairs from a JSONL file or from the recipe itself."""
    if isinstance(examples, str):
        from adapter_fusion.data_merge import load_examples

        return load_examples(examples)
    return [(e.input, e.target) for e in examples]


def run_recipe(
    recipe: Recipe,
    on_module: ProgressCallback | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
    on_example: ProgressCallback | None = None,
) -> MergeResult:
    """Load the recipe's source adapters (paths) and merge them (see `merge_recipe`)."""
    adapters = [load_adapter(s.adapter, allow_pickle=allow_pickle) for s in recipe.sources]
    name = recipe.name or (Path(recipe.output).name if recipe.output else "merged")
    return merge_recipe(recipe, adapters, name, recipe.base, device, on_module, on_example)


def merge_recipe(
    recipe: Recipe,
    adapters: list[Adapter],
    name: str,
    base: str | Path | None = None,
    device: str | None = None,
    on_module: ProgressCallback | None = None,
    on_example: ProgressCallback | None = None,
    bounds: FitBounds = FitBounds(),
) -> MergeResult:
    """Merge loaded `adapters` (the recipe's sources, in order) by the recipe; a data-aware method
    first runs its examples through `base` on `device`, in micro-batches and within `bounds`
    (refused before a model is loaded when over them). `on_example` ticks per example or Adam
    step, and again (with the last progress) between micro-batches and blocks, so raising from
    it stops the work within one block's forward or backward."""
    data = get_method(recipe.method).data
    last: list = []  # the latest progress, repeated by the ticks between

    def report(done: int, total: int, what: str) -> None:
        last[:] = [done, total, what]
        if on_example is not None:
            on_example(done, total, what)

    def tick() -> None:
        if on_example is not None and last:
            on_example(*last)

    if data == "coefficients":
        from adapter_fusion.learned import merge_learned

        steps = parse_parameters(get_method("learned"), recipe.parameters).steps
        last[:] = [0, steps, "fitting"]
        return merge_learned(
            adapters, read_examples(recipe.examples), base, recipe.weights, recipe.parameters, recipe.rank, recipe.seed,
            name, chat=recipe.chat, device=device, on_module=on_module, on_step=lambda done, total, loss: report(done, total, f"loss {loss:.4f}"),
            bounds=bounds, tick=tick,
        )
    if data is not None:
        from adapter_fusion.data_merge import merge_with_data

        examples = [read_examples(s.examples) for s in recipe.sources]
        last[:] = [0, sum(map(len, examples)), recipe.sources[0].adapter]
        return merge_with_data(
            adapters, recipe.method, examples, base, recipe.weights, recipe.parameters, recipe.rank, recipe.seed, name,
            chat=recipe.chat, device=device, on_module=on_module, on_example=report, bounds=bounds, tick=tick,
        )
    return merge(adapters, recipe.method, recipe.weights, recipe.parameters, recipe.rank, recipe.seed, name, on_module)


def merge_to_disk(
    recipe: Recipe,
    output: str | Path | None = None,
    overwrite: bool = False,
    on_module: ProgressCallback | None = None,
    device: str | None = None,
    on_example: ProgressCallback | None = None,
) -> tuple[MergeResult, Path]:
    """Run a recipe and save the result (atomically) to `output` or the recipe's output."""
    target = output or recipe.output
    if target is None:
        raise RecipeError("no output: set `output:` in the recipe or pass --output")
    if Path(target).exists() and not overwrite:  # fail before the work, not after it
        raise OutputExistsError(f"{target} already exists; choose another output or pass --overwrite")
    result = run_recipe(recipe, on_module=on_module, device=device, on_example=on_example)
    path = save_adapter(result.adapter, target, dtype=recipe.dtype, overwrite=overwrite)
    return result, path
