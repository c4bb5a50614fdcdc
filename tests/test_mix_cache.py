"""`MixCache`: a weighted mix written once as one PEFT dir, exact up to the engine's rank and the
exact SVD truncation above it; reused, built once under concurrency, refused when too big."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapter_fusion import load_adapter, merge
from adapter_fusion.errors import LimitExceededError
from adapter_fusion.mix_cache import MixCache

WEIGHTS = [0.7, -0.4]


def test_an_exact_mix_is_the_weighted_sum_and_is_reused(tiny_adapters: list[Path], tmp_path: Path) -> None:
    a, b = load_adapter(tiny_adapters[0]), load_adapter(tiny_adapters[2])  # ranks 4 and 8
    calls = []

    def sources():
        calls.append(1)
        return list(zip([a, b], WEIGHTS))

    cache = MixCache(tmp_path / "mixes", max_rank=16)
    first = cache.get("k1", sources)
    assert first.built and first.rank == 12 and first.relative_error == 0.0
    mixed = load_adapter(first.path)
    for path, delta in mixed.modules.items():
        expected = sum(w * s.modules[path].dense() for s, w in zip([a, b], WEIGHTS) if path in s.modules)
        scale = max(float(expected.abs().max()), 1.0)
        assert float((delta.dense() - expected).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale * 12, path
    again = cache.get("k1", sources)
    assert not again.built and again.path == first.path and again.rank == 12 and len(calls) == 1


def test_over_the_engines_rank_it_is_the_exact_truncation(tiny_adapters: list[Path], tmp_path: Path) -> None:
    a, b = load_adapter(tiny_adapters[0]), load_adapter(tiny_adapters[2])
    entry = MixCache(tmp_path / "mixes", max_rank=6).get("k2", lambda: list(zip([a, b], WEIGHTS)))
    reference = merge([a, b], "svd", WEIGHTS, rank=6)
    assert entry.rank == 6 and entry.relative_error == pytest.approx(max(m.relative_error for m in reference.report)) and entry.relative_error > 0
    mixed = load_adapter(entry.path)
    for path, delta in reference.adapter.modules.items():
        torch.testing.assert_close(mixed.modules[path].dense(), delta.dense(), rtol=1e-5, atol=1e-6)


def test_one_key_is_built_once_while_others_wait(tiny_adapters: list[Path], tmp_path: Path) -> None:
    a = load_adapter(tiny_adapters[0])
    cache, calls, results = MixCache(tmp_path / "mixes", max_rank=16), [], []
    arrived, release = threading.Barrier(4), threading.Event()

    def sources():
        calls.append(1)
        release.wait(30)  # the others are waiting on this key meanwhile
        return [(a, 0.5), (a, 0.25)]

    def get() -> None:
        arrived.wait(30)
        results.append(cache.get("same", sources))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    while not calls:  # the first caller is building
        threading.Event().wait(0.01)
    while cache._locks["same"][1] < 4:  # every caller holds or waits for the key's lock
        threading.Event().wait(0.01)
    release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1 and sorted(r.built for r in results) == [False, False, False, True]
    assert cache._locks == {}  # no lock is kept per key once nobody asks for it


def test_a_mix_over_the_size_cap_is_refused_before_composing(tiny_adapters: list[Path], tmp_path: Path) -> None:
    a = load_adapter(tiny_adapters[0])
    cache = MixCache(tmp_path / "mixes", max_rank=64, max_output_bytes=a.size_bytes * 3 - 1)
    with pytest.raises(LimitExceededError, match="over the cache's cap"):
        cache.get("big", lambda: [(a, 1.0)] * 3)
    assert not (tmp_path / "mixes" / "big").exists()


def test_a_full_cache_refuses_new_entries(tiny_adapters: list[Path], tmp_path: Path) -> None:
    a = load_adapter(tiny_adapters[0])
    cache = MixCache(tmp_path / "mixes", max_rank=64, max_cache_bytes=3 * a.size_bytes)
    cache.get("one", lambda: [(a, 1.0)])
    with pytest.raises(LimitExceededError, match="delete entries no engine uses"):
        cache.get("two", lambda: [(a, 1.0), (a, 0.5), (a, 0.25)])
    assert not cache.get("one", lambda: []).built  # what is there is still served
