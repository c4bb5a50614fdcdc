"""`LoraNames`: a name sent to a by-name engine (vLLM's resolver) becomes a PEFT dir from the store,
a mix of store entries, or a recipe, and nothing outside the store, the recipes directory and the
cache is read or written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from adapter_fusion import load_adapter, merge
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.errors import InvalidRequestError, LimitExceededError, NotFoundError, PathNotAllowedError
from adapter_fusion.lora_names import Limits, LoraNames
from adapter_fusion.server.store import AdapterStore


@pytest.fixture()
def names(tiny_adapters: list[Path], tmp_path: Path) -> LoraNames:
    store = AdapterStore(tmp_path / "store")
    for name, path in zip(("a", "b", "c"), tiny_adapters):
        adapter = load_adapter(path, name)
        store.save(adapter, AdapterInfo.of(adapter, str(path), pinned=False))
    (tmp_path / "recipes").mkdir()
    return LoraNames(tmp_path / "store", tmp_path / "cache", tmp_path / "recipes", Limits(max_rank=8, max_sources=4))


def test_a_store_name_is_its_entry(names: LoraNames, tmp_path: Path) -> None:
    found = names.resolve("a")
    assert found.path == (tmp_path / "store" / "a").resolve() and found.rank == 4 and not found.built


def test_a_mix_is_composed_once_and_follows_its_entries(names: LoraNames, tiny_adapters: list[Path], tmp_path: Path) -> None:
    first = names.resolve("mix:a=0.5+b=-0.25")
    assert first.built and first.rank == 8 and first.relative_error == 0.0 and first.path.is_relative_to(tmp_path / "cache")
    expected = merge([load_adapter(tiny_adapters[0]), load_adapter(tiny_adapters[1])], "cat", [0.5, -0.25]).adapter
    got = load_adapter(first.path)
    for path, delta in expected.modules.items():
        assert float((got.modules[path].dense() - delta.dense()).abs().max()) < 1e-5
    assert not names.resolve("mix:a=0.5+b=-0.25").built  # reused
    respelled = names.resolve("mix:b=-0.25+a=0.25+a=0.25")  # the same sum written otherwise: the same entry
    assert not respelled.built and respelled.path == first.path
    over = names.resolve("mix:a+c")  # ranks 4 + 8 over the engine's 8: the exact truncation, its error kept
    assert over.rank == 8 and over.relative_error > 0
    store = AdapterStore(tmp_path / "store")  # b replaced: the same mix name now means other factors
    replacement = load_adapter(tiny_adapters[3], "b")
    store.save(replacement, AdapterInfo.of(replacement, "elsewhere", pinned=False))
    assert names.resolve("mix:a=0.5+b=-0.25").built


@pytest.mark.parametrize(
    "name, error, says",
    [
        ("../a", InvalidRequestError, "invalid adapter name"),
        ("ghost", NotFoundError, "no adapter named"),
        ("mix:", InvalidRequestError, "an empty mix"),
        ("mix:a=nan", InvalidRequestError, "finite"),
        ("mix:a=one", InvalidRequestError, "not a number"),
        ("mix:a=1+../../etc", InvalidRequestError, "invalid adapter name"),
        ("mix:a+a+a+a+a", LimitExceededError, "the limit is 4"),
        ("recipe:../x", InvalidRequestError, "invalid adapter name"),
        ("recipe:none", NotFoundError, "no recipe"),
        ("x" * 5000, InvalidRequestError, "bytes"),
        ("a\n", InvalidRequestError, "invalid adapter name"),
    ],
)
def test_bad_names_are_refused_with_what_is_wrong(names: LoraNames, name: str, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        names.resolve(name)


def test_links_and_other_bases_are_refused(names: LoraNames, tiny_adapters: list[Path], tmp_path: Path) -> None:
    os.symlink(tiny_adapters[0], tmp_path / "store" / "linked")
    with pytest.raises(PathNotAllowedError, match="link"):
        names.resolve("linked")
    with pytest.raises(InvalidRequestError, match="trained on"):
        names.resolve("a", base_model="/models/another-model")
    assert names.resolve("a", base_model=str(load_adapter(tiny_adapters[0]).base_model)).rank == 4
    own = str(load_adapter(tiny_adapters[0]).base_model)
    assert names.resolve("mix:a+b", base_model=own).built
    with pytest.raises(InvalidRequestError, match="trained on"):  # the cached mix is not served on another base
        names.resolve("mix:a+b", base_model="/models/another-model")


def test_a_recipe_is_composed_from_the_store_only(names: LoraNames, tmp_path: Path) -> None:
    store = tmp_path / "store"
    recipe = {"method": "ties", "sources": [{"adapter": str(store / "a"), "weight": 0.6}, {"adapter": str(store / "b"), "weight": 0.4}], "rank": 4}
    (tmp_path / "recipes" / "both.yaml").write_text(yaml.safe_dump(recipe))
    found = names.resolve("recipe:both")
    assert found.built and found.rank == 4 and not names.resolve("recipe:both").built
    outside = {**recipe, "sources": [{"adapter": str(tmp_path.parent), "weight": 1.0}]}
    (tmp_path / "recipes" / "outside.yaml").write_text(yaml.safe_dump(outside))
    with pytest.raises(PathNotAllowedError, match="outside the store"):
        names.resolve("recipe:outside")


def test_a_recipe_that_learns_needs_the_served_model_as_a_directory(names: LoraNames, tmp_path: Path) -> None:
    store = tmp_path / "store"
    recipe = {"method": "regmean", "sources": [{"adapter": str(store / "a"), "weight": 0.5, "examples": [{"input": "x", "target": "y"}]},
                                               {"adapter": str(store / "b"), "weight": 0.5, "examples": [{"input": "x", "target": "y"}]}]}
    (tmp_path / "recipes" / "learns.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(InvalidRequestError, match="not a local directory"):
        names.resolve("recipe:learns", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
