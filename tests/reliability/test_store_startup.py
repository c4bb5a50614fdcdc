"""A store entry crafted to crash a JSON parser (deep nesting, a huge file) must not stop the
server: it starts, the entry is in `.quarantine/` with one log line, and the others still serve."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from adapter_fusion.adapters import CONFIG_NAME, load_adapter
from adapter_fusion.client import Client
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.server.app import ServerConfig
from adapter_fusion.server.store import META, QUARANTINE, AdapterStore

from .conftest import greedy, listing, serving

DEEP = "[" * 200_000  # RecursionError in json.loads


@pytest.mark.parametrize(
    ("damaged_file", "content", "reason"),
    [
        (META, DEEP, "nested deeper than 32 levels"),
        (CONFIG_NAME, DEEP, "nested deeper than 32 levels"),
        (META, '{"name": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 32 levels"),  # parses, but is no metadata
        (META, " " * (2 << 20), "2097152 bytes; the limit is 1048576"),  # refused before it is read
    ],
    ids=["deep metadata", "deep adapter config", "deep under the recursion limit", "metadata of 2 MB"],
)
def test_a_store_entry_that_breaks_json_is_quarantined_and_the_server_starts(
    tmp_path: Path, tok_base: Path, tok_adapters: list[Path], damaged_file: str, content: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(tmp_path / "store")
    for source in tok_adapters[:2]:
        adapter = load_adapter(source, source.name)
        store.save(adapter, AdapterInfo.of(adapter, str(source), pinned=False))
    (store.root / "beta" / damaged_file).write_text(content)
    config = ServerConfig(base_dir=tok_base, store_dir=store.root, output_roots=[tmp_path / "out"], port=0)
    with caplog.at_level(logging.WARNING, logger="adapter_fusion.store"), serving(config) as server, Client(server.address) as client:
        assert set(listing(client)) == {"alpha"}
        assert len(greedy(client, "alpha", tokens=3)) == 3  # the good entry still serves
    quarantined = list((store.root / QUARANTINE).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("beta.")
    assert (quarantined[0] / damaged_file).read_text() == content  # moved whole, for the operator to inspect
    lines = [r.message for r in caplog.records if "does not validate" in r.message]
    assert len(lines) == 1 and "beta" in lines[0] and reason in lines[0] and len(lines[0]) < 1000, lines  # one short line, not the file
    assert sorted(p.name for p in store.root.iterdir()) == [QUARANTINE, "alpha"]
    shutil.rmtree(store.root / QUARANTINE)
