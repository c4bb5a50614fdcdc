"""Hostile paths on every RPC that takes one (LoadAdapter.path, ExportAdapter.path,
BakeModel.output_path), against a real server whose process CWD is a sentinel directory.

Everything lives under one temp dir: the read and write roots, a sentinel tree outside them
(files next to the roots, in the CWD, a victim dir the symlinks point at), the store and the
base model. Every file's hash, every directory name and every symlink target under the temp dir
is recorded before and after the hostile calls: nothing outside the write root may be created,
changed or removed, and inside it only what a call was allowed to write. Status codes are
checked per case, and no error message may say where a symlink leads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import grpc
import pytest

from adapter_fusion.adapters import load_adapter
from adapter_fusion.atomic import MARKER, atomic_directory, is_ours
from adapter_fusion.client import Client
from adapter_fusion.server.app import ServerConfig

from .conftest import SERVING, bake, bump, code_of, export, health_status, load, serving

PD = grpc.StatusCode.PERMISSION_DENIED
IA = grpc.StatusCode.INVALID_ARGUMENT
AE = grpc.StatusCode.ALREADY_EXISTS
OK = grpc.StatusCode.OK


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: files by content hash and mode, dirs by name, links by target."""
    entries: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[rel] = ("dir",)
            else:
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return entries


def diff(before: dict, after: dict) -> list[str]:
    changes = [f"removed {k}" for k in before.keys() - after.keys()] + [f"created {k}" for k in after.keys() - before.keys()]
    changes += [f"changed {k}" for k in before.keys() & after.keys() if before[k] != after[k]]
    return sorted(changes)


@pytest.fixture
def tree(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    t = {name: tmp_path / name for name in ("cwd", "reads", "writes", "outside", "store", "base")}
    for p in t.values():
        p.mkdir()
    t["tmp"] = tmp_path
    shutil.copytree(tok_base, t["base"], dirs_exist_ok=True)
    (tmp_path / "beside-roots.txt").write_text("sentinel next to the roots\n")
    (t["cwd"] / "cwd-file.txt").write_text("sentinel in the server's CWD\n")
    shutil.copytree(tok_adapters[0], t["cwd"] / "cwd-adapter")  # an adapter a CWD-relative read would find
    # outside every root: a valid adapter, a victim dir, a file posing as a marker
    shutil.copytree(tok_adapters[1], t["outside"] / "adapter")
    (t["outside"] / "victim").mkdir()
    (t["outside"] / "victim" / "precious.txt").write_text("must survive\n")
    (t["outside"] / "marker-file").write_text('{"written_by": "adapter-fusion"}\n')
    # the read root
    shutil.copytree(tok_adapters[0], t["reads"] / "good")
    os.symlink(t["outside"] / "adapter", t["reads"] / "link-dir")  # a dir link pointing out
    (t["reads"] / "link-weights").mkdir()  # a real config, weights linked to a file outside
    shutil.copy(tok_adapters[1] / "adapter_config.json", t["reads"] / "link-weights")
    os.symlink(t["outside"] / "adapter" / "adapter_model.safetensors", t["reads"] / "link-weights" / "adapter_model.safetensors")
    (t["reads"] / "link-config").mkdir()  # real weights, config linked to a file outside
    shutil.copy(tok_adapters[1] / "adapter_model.safetensors", t["reads"] / "link-config")
    os.symlink(t["outside"] / "adapter" / "adapter_config.json", t["reads"] / "link-config" / "adapter_config.json")
    os.symlink("loop", t["reads"] / "loop")  # a link to itself
    # the write root: a dir we did not write, one posing as ours with a linked marker, links out
    (t["writes"] / "foreign").mkdir()
    (t["writes"] / "foreign" / "data.txt").write_text("someone else's\n")
    (t["writes"] / "fake-ours").mkdir()
    os.symlink(t["outside"] / "marker-file", t["writes"] / "fake-ours" / MARKER)
    (t["writes"] / "fake-ours" / "data.txt").write_text("not ours either\n")
    (t["writes"] / "a-file.txt").write_text("a plain file\n")
    os.symlink(t["outside"] / "victim", t["writes"] / "link-out")
    os.symlink(t["outside"] / "not-yet", t["writes"] / "dangling")  # points at nothing, outside
    os.symlink(t["outside"] / "marker-file", t["writes"] / "link-file")
    monkeypatch.chdir(t["cwd"])  # the in-process server's CWD is the sentinel dir
    return t


def _leaks(details: str, given: str, t: dict[str, Path]) -> bool:
    """Whether an error message names a place outside the roots that the client did not name."""
    outside = str(t["outside"])
    return outside in details and outside not in os.path.abspath(os.path.join(str(t["reads"]), given))


def test_hostile_paths_touch_nothing_outside_the_write_root(tree: dict[str, Path]) -> None:
    t = tree
    config = ServerConfig(base_dir=t["base"], store_dir=t["store"], adapter_roots=[t["reads"]], output_roots=[t["writes"]], port=0)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "good")
        export(client, "alpha", "ours")  # written by us: may be replaced on request
        assert is_ours(t["writes"] / "ours")
        before = snapshot(t["tmp"])

        load_cases = [
            ("/etc", {PD}),
            (str(t["outside"] / "adapter"), {PD}),
            ("../outside/adapter", {PD}),
            ("good/../../outside/adapter", {PD}),
            ("link-dir", {PD}),
            (str(t["reads"] / "link-dir"), {PD}),
            ("link-dir/../good", {PD}),  # `..` after a link: resolved on the real path, which is outside
            ("link-weights", {PD}),
            ("link-config", {PD}),
            ("loop", {PD, IA}),
            (".", {IA}),  # the read root itself: allowed to read, but not an adapter
            (str(t["reads"]), {IA}),
            ("..", {PD}),
            (str(t["tmp"]), {PD}),
            (str(t["cwd"]), {PD}),
            (str(t["cwd"] / "cwd-adapter"), {PD}),
            ("cwd-adapter", {IA}),  # relative paths resolve against the read root, never the CWD
            (str(t["store"]), {PD}),
            (str(t["store"] / "alpha"), {PD}),
            (str(t["base"]), {PD}),
            (str(t["writes"] / "ours"), {PD}),
            (str(t["tmp"] / "beside-roots.txt"), {PD}),
        ]
        failures = []
        for i, (path, expected) in enumerate(load_cases):
            code, details = code_of(lambda: load(client, f"h{i}", path))
            bump("hostile_paths_tried")
            if code not in expected:
                failures.append(f"LoadAdapter {path!r}: {code.name} (expected {sorted(c.name for c in expected)}) {details[:200]}")
            if _leaks(details, path, t):
                failures.append(f"LoadAdapter {path!r}: the message names a place outside the roots: {details[:300]}")

        write_cases = [  # (path, expected without overwrite, expected with overwrite)
            (str(t["outside"] / "new"), {PD}, {PD}),
            ("../outside/new", {PD}, {PD}),
            ("ours/../../outside/new", {PD}, {PD}),
            (str(t["outside"] / "victim"), {PD}, {PD}),
            ("link-out", {PD}, {PD}),
            ("link-out/new", {PD}, {PD}),
            ("dangling", {PD}, {PD}),
            ("link-file", {PD}, {PD}),
            (".", {PD}, {PD}),  # the write root itself
            (str(t["writes"]), {PD}, {PD}),
            ("..", {PD}, {PD}),  # its parent (holds every root)
            (str(t["tmp"]), {PD}, {PD}),
            (str(t["cwd"]), {PD}, {PD}),
            (str(t["cwd"] / "new"), {PD}, {PD}),
            (str(t["reads"]), {PD}, {PD}),
            (str(t["reads"] / "good"), {PD}, {PD}),
            (str(t["store"]), {PD}, {PD}),
            (str(t["store"] / "alpha"), {PD}, {PD}),
            (str(t["store"] / "new"), {PD}, {PD}),
            (str(t["base"]), {PD}, {PD}),
            (str(t["base"] / "new"), {PD}, {PD}),
            (str(t["tmp"] / "beside-roots.txt"), {PD}, {PD}),
            ("foreign", {AE}, {PD}),  # not written by adapter-fusion: never replaced
            ("fake-ours", {AE}, {PD}),  # its marker is a symlink: not ours
            ("a-file.txt", {AE}, {PD}),
            ("foreign/data.txt", {AE}, {PD}),
            ("a-file.txt/below", {IA, PD}, {IA, PD}),
        ]
        for path, plain, forced in write_cases:
            for overwrite, expected in ((False, plain), (True, forced)):
                for rpc, call in (
                    ("ExportAdapter", lambda: export(client, "alpha", path, overwrite)),
                    ("BakeModel", lambda: bake(client, "alpha", path, overwrite)),
                ):
                    code, details = code_of(call)
                    bump("hostile_paths_tried")
                    if code not in expected:
                        failures.append(f"{rpc} {path!r} overwrite={overwrite}: {code.name} (expected {sorted(c.name for c in expected)}) {details[:200]}")
                    if "outside" in details and "outside" not in path:
                        failures.append(f"{rpc} {path!r}: the message names where a link leads: {details[:300]}")
        assert not failures, "\n".join(failures)
        assert health_status(server.address) == SERVING

        after = snapshot(t["tmp"])
        assert diff(before, after) == [], "hostile calls changed the tree"

        # what is allowed: a relative path lands under the write root (not the CWD); our own output
        # can be replaced, and only with overwrite
        assert code_of(lambda: export(client, "alpha", "ours"))[0] == AE
        export(client, "alpha", "ours", overwrite=True)
        messages = bake(client, "alpha", "ours", overwrite=True)  # a bake may replace our export too
        assert messages[-1].manifest_json and (t["writes"] / "ours" / "config.json").is_file() and is_ours(t["writes"] / "ours")
        export(client, "alpha", "rel-new")
        assert load_adapter(t["writes"] / "rel-new").modules and not (t["cwd"] / "rel-new").exists()
        final = snapshot(t["tmp"])
        changed = [c for c in diff(before, final) if not c.split(" ", 1)[1].startswith(("writes/ours", "writes/rel-new"))]
        assert changed == [], changed
        bump("hostile_paths_allowed_writes_checked", 4)


def test_store_and_base_inside_the_write_root_are_never_written(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """A write root that contains the store and the base model (both written by adapter-fusion,
    so both carry the marker): neither may be written into or replaced, with or without overwrite."""
    writes, reads = tmp_path / "w", tmp_path / "r"
    reads.mkdir()
    shutil.copytree(tok_adapters[0], reads / "good")
    with atomic_directory(writes / "base") as tmp:  # the base as `default_base()` writes it: with a marker
        shutil.copytree(tok_base, tmp, dirs_exist_ok=True)
    assert is_ours(writes / "base")
    config = ServerConfig(base_dir=writes / "base", store_dir=writes / "store", adapter_roots=[reads], output_roots=[writes], port=0)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "good")
        assert is_ours(writes / "store" / "alpha")  # a store entry carries the marker too
        before = snapshot(tmp_path)
        failures = []
        for path in ("store", "store/alpha", "store/new", "store/.quarantine", "base", "base/new", str(writes / "store" / "alpha"), "base/../store"):
            for overwrite in (False, True):
                for rpc, call in (
                    ("ExportAdapter", lambda: export(client, "alpha", path, overwrite)),
                    ("BakeModel", lambda: bake(client, "alpha", path, overwrite)),
                ):
                    code, details = code_of(call)
                    bump("hostile_paths_tried")
                    if code != PD:
                        failures.append(f"{rpc} {path!r} overwrite={overwrite}: {code.name} {details[:200]}")
        assert not failures, "\n".join(failures)
        assert diff(before, snapshot(tmp_path)) == []
        export(client, "alpha", "fine")  # elsewhere in the same root is allowed
        assert load_adapter(writes / "fine").modules


def test_messages_never_say_where_a_link_inside_a_root_leads(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    """A symlink that stays inside the read root is followed (allowed), but the error for what it
    leads to must still be phrased with the path the client gave, not the link's target."""
    reads, writes = tmp_path / "reads", tmp_path / "writes"
    (reads / "hidden-target-dir").mkdir(parents=True)  # not an adapter
    os.symlink(reads / "hidden-target-dir", reads / "innocent-link")
    (reads / "hidden-half").mkdir()
    shutil.copy(tok_adapters[0] / "adapter_config.json", reads / "hidden-half")  # config only: no weights
    os.symlink(reads / "hidden-half", reads / "other-link")
    config = ServerConfig(base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[reads], output_roots=[writes], port=0)
    with serving(config) as server, Client(server.address) as client:
        for given, target in (("innocent-link", "hidden-target-dir"), ("other-link", "hidden-half")):
            code, details = code_of(lambda: load(client, "x", given))
            bump("hostile_paths_tried")
            assert code == IA, details
            assert target not in details, f"LoadAdapter {given!r}: the message names the link's target: {details}"
