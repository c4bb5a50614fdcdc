"""A directory inside a write root swapped for a symlink to elsewhere while exports and bakes
run over the wire: the swap may land between the server's path check and its write. Nothing may
ever appear outside the write root, and every call ends OK or with a clean refusal, never
INTERNAL."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc

from adapter_fusion.adapters import load_adapter
from adapter_fusion.client import Client
from adapter_fusion.server.app import ServerConfig

from .conftest import bake, bump, code_of, export, load, serving
from .test_hostile_paths import diff, snapshot

CALLS = 120  # exports and bakes while the flipping runs (~0.1 s each on the tiny model)
CALL_TIMEOUT = 30.0
OK, PD, IA = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT


class Flipper:
    """Swaps writes/sub between a real directory and a symlink to `outside`, as fast as renames go."""

    def __init__(self, writes: Path, outside: Path) -> None:
        self.sub, self.aside, self.link = writes / "sub", writes / "sub-aside", writes / "sub-link"
        self.outside = outside
        self.sub.mkdir()
        self.stop = threading.Event()
        self.flips = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                os.symlink(self.outside, self.link)
                os.rename(self.sub, self.aside)  # the real dir steps aside...
                self._put(self.link, self.sub)  # ...and a link to outside takes its name
                time.sleep(0.001)  # paces the attacker (2 cores); nothing is awaited here
                os.unlink(self.sub)
                self._put(self.aside, self.sub)  # the real dir is back
                self.flips += 1
                time.sleep(0.001)
        except BaseException as error:  # noqa: BLE001 (reported by __exit__)
            self.error = error

    def _put(self, source: Path, target: Path) -> None:
        """Rename; a write that found `target` missing meanwhile made it: keep that one in the root."""
        for attempt in range(100):
            try:
                os.rename(source, target)
                return
            except OSError:
                os.rename(target, target.with_name(f"made-{self.flips}-{attempt}"))
        raise AssertionError(f"could not put {source.name} back")

    def __enter__(self) -> Flipper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive() and self.error is None, self.error


def test_a_directory_swapped_for_a_symlink_mid_write_never_redirects_it(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    reads, writes, outside, store = (tmp_path / n for n in ("reads", "writes", "outside", "store"))
    for directory in (reads, writes, outside):
        directory.mkdir()
    shutil.copytree(tok_adapters[0], reads / "alpha")
    (outside / "precious.txt").write_text("outside every root\n")
    config = ServerConfig(base_dir=tok_base, store_dir=store, adapter_roots=[reads], output_roots=[writes], port=0)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        before = snapshot(outside)
        codes: dict[str, int] = {}
        failures: list[str] = []
        written: list[str] = []
        with Flipper(writes, outside) as flipper:
            for i in range(CALLS):
                rpc, path = ("BakeModel", f"sub/bake{i}") if i % 4 == 3 else ("ExportAdapter", f"sub/out{i}")
                call = (lambda: bake(client, "alpha", path, timeout=CALL_TIMEOUT)) if rpc == "BakeModel" else (lambda: export(client, "alpha", path, timeout=CALL_TIMEOUT))
                code, details = code_of(call)
                codes[code.name] = codes.get(code.name, 0) + 1
                if code == OK:
                    written.append(path.split("/")[1])
                elif code not in (PD, IA):  # IA: the check itself met the swap (a path that "cannot be used")
                    failures.append(f"{rpc} {path}: {code.name} {details[:300]}")
                if "outside" in details:
                    failures.append(f"{rpc} {path}: the message names where the link leads: {details[:300]}")
                leaked = diff(before, snapshot(outside))
                if leaked:
                    failures.append(f"after {rpc} {path} ({code.name}) the outside dir changed: {leaked[:5]}")
                    break
        bump("write_race_calls", sum(codes.values()))
        bump("write_race_flips", flipper.flips)
        assert not failures, "\n".join(failures) + f"\ncodes: {codes}"
        assert diff(before, snapshot(outside)) == []
        # the race was really run: some calls found the link (refused), some the real dir (written)
        assert codes.get("OK", 0) > 0 and codes.get("PERMISSION_DENIED", 0) > 0, codes
        # what was acknowledged is whole, under the write root, and no temp dir is left anywhere
        found = {p.name: p for p in writes.glob("*/*") if p.parent.name == "sub" or p.parent.name.startswith("made-")}
        assert set(written) <= set(found), set(written) - set(found)
        for name in (n for n in written if n.startswith("out")):
            assert load_adapter(found[name]).modules
        leftovers = [str(p.relative_to(writes)) for p in writes.rglob("*") if p.name.endswith((".tmp", ".old"))]
        assert leftovers == []
