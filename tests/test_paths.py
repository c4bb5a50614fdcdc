"""The path policy on its own: what a client may read and write, and what it never may."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapter_fusion import load_adapter, save_adapter
from adapter_fusion.errors import InvalidRequestError, OutputExistsError, PathNotAllowedError
from adapter_fusion.server.paths import PathPolicy

DEMO = Path(__file__).parent.parent / "examples" / "adapters"


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    places = {name: tmp_path / name for name in ("adapters", "exports", "store", "base", "secret")}
    for place in places.values():
        place.mkdir()
    shutil.copytree(DEMO / "uppercase", places["adapters"] / "upper")
    shutil.copytree(DEMO / "reverse_words", places["secret"] / "reverse")
    return places


@pytest.fixture()
def policy(tree: dict[str, Path]) -> PathPolicy:
    return PathPolicy.of([tree["adapters"]], [tree["exports"]], protected=[tree["store"], tree["base"]])


def test_reads_resolve_against_the_first_read_root(policy: PathPolicy, tree: dict[str, Path]) -> None:
    assert policy.readable("upper") == tree["adapters"] / "upper"
    assert policy.readable(str(tree["adapters"] / "upper")) == tree["adapters"] / "upper"
    assert policy.readable("upper/../upper") == tree["adapters"] / "upper"


@pytest.mark.parametrize("path", ["/etc", "..", "../secret/reverse", "upper/../../secret/reverse", "link-out", "hidden-weights"])
def test_reads_outside_the_read_roots_are_refused(policy: PathPolicy, tree: dict[str, Path], path: str) -> None:
    os.symlink(tree["secret"] / "reverse", tree["adapters"] / "link-out")
    mixed = tree["adapters"] / "hidden-weights"  # a real dir whose weights file alone links out
    mixed.mkdir()
    shutil.copy(tree["adapters"] / "upper" / "adapter_config.json", mixed)
    os.symlink(tree["secret"] / "reverse" / "adapter_model.safetensors", mixed / "adapter_model.safetensors")
    with pytest.raises(PathNotAllowedError) as refused:
        policy.readable(path)
    assert str(tree["secret"]) not in str(refused.value)  # never where a link leads


def test_writes_go_strictly_inside_a_write_root(policy: PathPolicy, tree: dict[str, Path]) -> None:
    assert policy.writable("out", overwrite=False) == tree["exports"] / "out"
    assert policy.writable("deep/er/out", overwrite=False) == tree["exports"] / "deep" / "er" / "out"
    for path in (".", str(tree["exports"]), "..", str(tree["adapters"] / "new"), str(tree["secret"] / "x"), "/tmp/x", os.getcwd()):
        with pytest.raises(PathNotAllowedError):
            policy.writable(path, overwrite=True)


def test_writes_never_touch_roots_their_ancestors_the_store_or_the_base(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    inner = {name: exports / name for name in ("adapters", "store", "base")}  # an operator nesting everything
    for place in inner.values():
        place.mkdir(parents=True)
    policy = PathPolicy.of([inner["adapters"]], [exports], protected=[inner["store"], inner["base"]])
    for path in ("adapters", "store", "base", "store/entry", "base/model", "store/../store"):
        with pytest.raises(PathNotAllowedError):
            policy.writable(path, overwrite=True)
    assert policy.writable("adapters/new", overwrite=False) == inner["adapters"] / "new"  # a new dir in a read root


def test_overwrite_replaces_only_what_this_project_wrote(policy: PathPolicy, tree: dict[str, Path]) -> None:
    foreign = tree["exports"] / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("someone's data")
    with pytest.raises(OutputExistsError):
        policy.writable("foreign", overwrite=False)
    with pytest.raises(PathNotAllowedError, match="not written by adapter-fusion"):
        policy.writable("foreign", overwrite=True)
    (tree["exports"] / "a-file").write_text("x")
    with pytest.raises(PathNotAllowedError):
        policy.writable("a-file", overwrite=True)
    ours = save_adapter(load_adapter(DEMO / "uppercase"), tree["exports"] / "ours")
    assert policy.writable("ours", overwrite=True) == ours


@pytest.mark.parametrize(
    ("path", "message"),
    [("", "empty"), ("a\x00b", "NUL"), ("x" * 300, "over 255 bytes"), ("a/" * 2100, "limit is 4096"), ("a-file/child", "is a file")],
)
def test_malformed_paths_are_invalid_arguments(policy: PathPolicy, tree: dict[str, Path], path: str, message: str) -> None:
    (tree["exports"] / "a-file").write_text("x")
    with pytest.raises(InvalidRequestError, match=message):
        policy.writable(path, overwrite=False)


def test_no_roots_means_no_paths(tree: dict[str, Path]) -> None:
    policy = PathPolicy.of([], [])
    with pytest.raises(PathNotAllowedError, match="--adapter-root"):
        policy.readable("upper")
    with pytest.raises(PathNotAllowedError, match="--output-root"):
        policy.writable("out", overwrite=False)
