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
from dataclasses import dataclass
from pathlib import Path

from adapter_fusion.adapters import CONFIG_NAME, WEIGHTS_NAME, Adapter, _base_key, load_adapter
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


class LoraNames:
    def __init__(self, store: str | Path, cache: str | Path, recipes: str | Path | None = None, limits: Limits = Limits()) -> None:
        self.store = Path(store).resolve()
        self.recipes = Path(recipes).resolve() if recipes else None
        self.limits = limits
        self.cache = MixCache(cache, limits.max_rank, limits.max_output_bytes)

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
            return self.cache.get(_key("entry", name, _stamp(path)), lambda: [(adapter, 1.0)])
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
        key = _key("mix", *(f"{name}={weight!r}" for name, weight in terms), *(f"{n}:{_stamp(p)}" for n, p in sorted(paths.items())))

        def sources() -> list[tuple[Adapter, float]]:
            loaded = {name: load_adapter(path, name) for name, path in paths.items()}
            for adapter in loaded.values():
                _check_base(adapter, base_model)
            return [(loaded[name], weight) for name, weight in terms]

        return self.cache.get(key, sources)

    def _recipe(self, name: str, base_model: str | None) -> CachedMix:
        from adapter_fusion.recipe import load_recipe, run_recipe

        if self.recipes is None:
            raise NotFoundError("no recipes directory is configured (ADAPTER_FUSION_RECIPES)")
        file = next((self.recipes / f"{name}{ext}" for ext in (".yaml", ".yml") if (self.recipes / f"{name}{ext}").is_file()), None)
        if file is None or file.is_symlink():
            raise NotFoundError(f"no recipe {quoted(name)} in {self.recipes}")
        recipe = load_recipe(file)
        read = [s.adapter for s in recipe.sources] + [e for e in (recipe.examples, *(s.examples for s in recipe.sources)) if isinstance(e, str)]
        for path in read + ([recipe.base] if recipe.base else []):
            if not any(Path(path).resolve().is_relative_to(root) for root in (self.store, self.recipes)):
                raise PathNotAllowedError(f"recipe {quoted(name)} reads a file outside the store and the recipes directory")
        if recipe.base is None and base_model and Path(base_model).is_dir():  # a data-aware method learns on the served model
            recipe = recipe.model_copy(update={"base": base_model})
        sources = [Path(s.adapter) for s in recipe.sources]
        key = _key("recipe", name, hashlib.sha256(file.read_bytes()).hexdigest(), *(_stamp(s) for s in sources))

        def composed() -> list[tuple[Adapter, float]]:
            adapter = run_recipe(recipe, device="cpu").adapter
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
