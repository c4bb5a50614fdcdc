"""A backtracking regex in an adapter's config (`(.+)+!` as a rank_pattern key, an alpha_pattern
key or the target_modules string) is INVALID_ARGUMENT within the regex bound, naming the key,
while health and a Generate on another adapter keep answering; nothing is registered."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from adapter_fusion.client import Client
from adapter_fusion.patterns import PatternBounds
from adapter_fusion.server.app import ServerConfig

from .conftest import SERVING, bump, code_of, greedy, health_status, listing, load, serving

EVIL = "(.+)+!"  # valid; Python's re backtracks through 2^len(name) splits of every module name
CASES = {
    "rank_pattern": {"rank_pattern": {EVIL: 4}},
    "alpha_pattern": {"alpha_pattern": {EVIL: 8}},
    "target_modules": {"target_modules": EVIL},
}


@pytest.mark.parametrize("field", sorted(CASES))
def test_backtracking_pattern_is_refused_while_the_server_keeps_serving(field: str, tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    roots = tmp_path / "adapters"
    shutil.copytree(tok_adapters[0], roots / "alpha")
    shutil.copytree(tok_adapters[1], roots / "evil")
    config_path = roots / "evil" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **CASES[field]}))
    config = ServerConfig(base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[roots], port=0)

    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        before = greedy(client, "alpha", tokens=4)
        outcome: dict[str, object] = {}

        def hostile() -> None:
            outcome["start"] = time.monotonic()
            outcome["status"] = code_of(lambda: load(client, "evil", "evil", timeout=10.0))
            outcome["end"] = time.monotonic()

        thread = threading.Thread(target=hostile)
        thread.start()
        answered: list[float] = []  # when health and a Generate answered, both correctly
        while thread.is_alive():
            assert health_status(server.address, timeout=1.0) == SERVING
            assert greedy(client, "alpha", tokens=4, timeout=5.0) == before
            answered.append(time.monotonic())
        thread.join(timeout=15)

        code, message = outcome["status"]
        took = outcome["end"] - outcome["start"]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
        assert f"{field} key {EVIL!r}" in message and "longer than" in message, message
        assert took < PatternBounds().regex_time_s + 1.5, f"refused only after {took:.2f} s"
        during = [t for t in answered if outcome["start"] < t < outcome["end"]]
        assert during, "no health check and Generate completed while the load ran"
        assert "evil" not in listing(client)
        assert health_status(server.address) == SERVING
        bump("pattern_refusals")
        print(f"{field}: INVALID_ARGUMENT after {took:.2f} s; {len(during)} health+Generate rounds answered meanwhile")
