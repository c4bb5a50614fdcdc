"""What a LoRA name sent to an engine that resolves adapters by name (vLLM's `LoRAResolver`)
means here, and the PEFT dir that serves it:

- `NAME`: the store entry NAME (loaded, composed or searched earlier through the server or CLI);
- `mix:a=0.5+b=-0.25`: Σ wᵢ ΔWᵢ of store entries, exact up to the engine's largest LoRA rank and
  the exact SVD truncation above it (`adapter_fusion.mix_cache`), composed once per canonical mix
  and the entries' current files, then reused;
- `recipe:NAME`: the recipe file NAME.yaml in the recipes directory (any method), composed once
  per file content and its sources' files.

Nothing outside the store, the recipes directory and the cache is read or written: names follow
the store's rules, entries and their files must not be links, a recipe's sources must lie in the
store or the recipes directory.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapter_fusion.adapters import CONFIG_NAME, WEIGHTS_NAME, Adapter, _base_key, load_adapter
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.merge import get_method
from adapter_fusion.merge.cost import merge_cost
from adapter_fusion.errors import InvalidRequestError, LimitExceededError, NotFoundError, PathNotAllowedError, quoted
from adapter_fusion.merge.driver import MAX_ABS_WEIGHT
from adapter_fusion.mix_cache import CachedMix, MixCache
from adapter_fusion.names import check_name

MIX, RECIPE = "mix:", "recipe:"
MAX_NAME_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    max_rank: int = 16  # the engine's largest LoRA rank (vLLM's --max-lora-rank)
    max_sources: int = 64  # adapters in one mix
    max_output_bytes: int = 1 << 30  # one composed entry's factors
    max_dense_values: int = 2_000_000_000  # an elementwise recipe's dense work (as the server's cap)
    max_cache_bytes: int = 20 << 30  # every composed entry together; past it, new ones are refused until some are deleted
    fit: FitBounds = field(default_factory=lambda: FitBounds(max_memory_bytes=4 << 30, max_work_tokens=1_000_000))  # data-aware recipes, as the server's defaults


class LoraNames:
    def __init__(self, store: str | Path, cache: str | Path, recipes: str | Path | None = None, limits: Limits = Limits()) -> None:
        self.store = Path(store).resolve()
        self.recipes = Path(recipes).resolve() if recipes else None
        self.limits = limits
        self.cache = MixCache(cache, limits.max_rank, limits.max_output_bytes, limits.max_cache_bytes)

    def resolve(self, name: str, base_model: str | None = None) -> CachedMix:
        """The PEFT dir serving `name` on `base_model` (a path or name; compared by its last part)."""
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidRequestError(f"the LoRA name is over {MAX_NAME_BYTES} bytes")
        if name.startswith(MIX):
            return self._mix(name.removeprefix(MIX), base_model)
        if name.startswith(RECIPE):
            return self._recipe(check_name(name.removeprefix(RECIPE)), base_model)
        path = self._entry(check_name(name))
        adapter = load_adapter(path, name)
        _check_base(adapter, base_model)
        if max(adapter.ranks.values(), default=0) > self.limits.max_rank:  # the engine would refuse it: serve its truncation
            return self.cache.get(_key("entry", _base_key(base_model) or "", name, _stamp(path)), lambda: [(adapter, 1.0)])
        return CachedMix(path, max(adapter.ranks.values(), default=0), 0.0, built=False)

    def _entry(self, name: str) -> Path:
        """The store entry's dir, if it is a real dir of real files inside the store."""
        path = self.store / name
        if not path.is_dir():
            raise NotFoundError(f"no adapter named {quoted(name)} in the store {self.store}")
        for part in (path, path / CONFIG_NAME, path / WEIGHTS_NAME):
            if part.is_symlink():
                raise PathNotAllowedError(f"store entry {quoted(name)} holds a link; it is not served")
        return path

    def _mix(self, body: str, base_model: str | None) -> CachedMix:
        terms = _parse_mix(body)
        if len(terms) > self.limits.max_sources:
            raise LimitExceededError(f"the mix has {len(terms)} adapters; the limit is {self.limits.max_sources}")
        terms = _canonical(terms)
        paths = {name: self._entry(name) for name, _ in terms}
        key = _key("mix", _base_key(base_model) or "", *(f"{name}={weight!r}" for name, weight in terms), *(f"{n}:{_stamp(p)}" for n, p in paths.items()))  # terms are sorted

        def sources() -> list[tuple[Adapter, float]]:
            loaded = {name: load_adapter(path, name) for name, path in paths.items()}
            for adapter in loaded.values():
                _check_base(adapter, base_model)
            return [(loaded[name], weight) for name, weight in terms]

        return self.cache.get(key, sources)

    def _recipe(self, name: str, base_model: str | None) -> CachedMix:
        from adapter_fusion.recipe_run import load_recipe, merge_recipe

        if self.recipes is None:
            raise NotFoundError("no recipes directory is configured (ADAPTER_FUSION_RECIPES)")
        file = next((self.recipes / f"{name}{ext}" for ext in (".yaml", ".yml") if (self.recipes / f"{name}{ext}").is_file()), None)
        if file is None or file.is_symlink():
            raise NotFoundError(f"no recipe {quoted(name)} in {self.recipes}")
        recipe = load_recipe(file)
        sources = [Path(s.adapter) for s in recipe.sources]
        example_files = [Path(e) for e in (recipe.examples, *(s.examples for s in recipe.sources)) if isinstance(e, str)]  # else inline
        for path in sources + example_files + ([Path(recipe.base)] if recipe.base else []):
            if not any(path.resolve().is_relative_to(root) for root in (self.store, self.recipes)):
                raise PathNotAllowedError(f"recipe {quoted(name)} reads a file outside the store and the recipes directory")
        if get_method(recipe.method).data is not None:  # learns on the served model: its own directory, never another
            if not (base_model and Path(base_model).is_dir()):
                raise InvalidRequestError(f"recipe {quoted(name)} learns from examples on the served model, which is not a local directory")
            recipe = recipe.model_copy(update={"base": base_model})
        # keyed by what it reads: its text, its sources' and example files' (edited: recomposed), the base
        key = _key("recipe", _base_key(base_model) or "", name, hashlib.sha256(file.read_bytes()).hexdigest(), *(_stamp(p) for p in sources + [e for e in example_files if e.is_file()]))

        def composed() -> list[tuple[Adapter, float]]:
            adapters = [load_adapter(source) for source in sources]
            cost = merge_cost(adapters, get_method(recipe.method), recipe.rank)
            if cost.output_bytes > self.limits.max_output_bytes or cost.dense_values > self.limits.max_dense_values:
                raise LimitExceededError(
                    f"recipe {quoted(name)} would write {cost.output_bytes / 1e6:.1f} MB and form {cost.dense_values:,} dense values; "
                    f"the limits are {self.limits.max_output_bytes / 1e6:.1f} MB and {self.limits.max_dense_values:,}"
                )
            adapter = merge_recipe(recipe, adapters, name, recipe.base, "cpu", bounds=self.limits.fit).adapter
            _check_base(adapter, base_model)
            return [(adapter, 1.0)]

        return self.cache.get(key, composed)


def _parse_mix(body: str) -> list[tuple[str, float]]:
    """`a=0.5+b=-0.25` -> [("a", 0.5), ("b", -0.25)]; a weight may be omitted (1)."""
    terms = []
    for term in body.split("+") if body else []:
        name, _, weight = term.partition("=")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise InvalidRequestError(f"mix term {quoted(term)}: the weight is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_ABS_WEIGHT:
            raise InvalidRequestError(f"mix term {quoted(term)}: weights must be finite and within ±{MAX_ABS_WEIGHT:g}")
        terms.append((check_name(name), value))
    if not terms:
        raise InvalidRequestError("an empty mix: write mix:NAME=WEIGHT+NAME=WEIGHT")
    return terms


def _canonical(terms: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """One term per adapter (weights of a repeated name add up), sorted: every spelling of one
    sum is one cache entry."""
    summed: dict[str, float] = {}
    for name, weight in terms:
        summed[name] = summed.get(name, 0.0) + weight
    return sorted(summed.items())


def _check_base(adapter: Adapter, base_model: str | None) -> None:
    if adapter.base_model and base_model and _base_key(adapter.base_model) != _base_key(base_model):
        raise InvalidRequestError(f"adapter {quoted(adapter.name)} was trained on {adapter.base_model}, not on {base_model}")


def _stamp(path: Path) -> str:
    """Changes whenever the files are replaced (a store write renames a new dir into place)."""
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    stat = os.stat(weights, follow_symlinks=False)
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]
