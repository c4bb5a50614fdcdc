"""A recipe file read and run: YAML, ours or a mergekit config (it has `merge_method`, read
through `adapter_fusion.mergekit`), relative paths taken from its folder; then its sources loaded
and merged (data-aware methods through the base model), or written to its output.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from adapter_fusion.adapter_save import save_adapter
from adapter_fusion.adapters import Adapter, load_adapter
from adapter_fusion.errors import OutputExistsError, RecipeError
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.merge import MergeResult, get_method, merge
from adapter_fusion.merge.driver import ProgressCallback
from adapter_fusion.mergekit import to_recipe
from adapter_fusion.recipe import Example, Recipe, parse_recipe

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
        from adapter_fusion.coefficient_fit import learned_settings, merge_learned

        steps = learned_settings(recipe.parameters).steps
        last[:] = [0, steps, "fitting"]
        return merge_learned(
            adapters, read_examples(recipe.examples), base, recipe.weights, recipe.parameters, rank=recipe.rank, seed=recipe.seed,
            name=name, chat=recipe.chat, device=device, on_module=on_module, on_step=lambda done, total, loss: report(done, total, f"loss {loss:.4f}"),
            bounds=bounds, tick=tick,
        )
    if data is not None:
        from adapter_fusion.data_merge import merge_with_data

        examples = [read_examples(s.examples) for s in recipe.sources]
        last[:] = [0, sum(map(len, examples)), recipe.sources[0].adapter]
        return merge_with_data(
            adapters, recipe.method, examples, base, recipe.weights, recipe.parameters, rank=recipe.rank, seed=recipe.seed, name=name,
            chat=recipe.chat, device=device, on_module=on_module, on_example=report, bounds=bounds, tick=tick,
        )
    return merge(adapters, recipe.method, recipe.weights, recipe.parameters, rank=recipe.rank, seed=recipe.seed, name=name, on_module=on_module)


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
