"""Disk quotas over the wire: the store (ComposeAdapter, LoadAdapter) and each write root
(ExportAdapter, BakeModel) refuse a write that would pass their quota with RESOURCE_EXHAUSTED
before a byte is written, say which quota and how to free room, and take writes again once room
is freed."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc

from adapter_fusion.adapter_save import saved_bytes
from adapter_fusion.adapters import load_adapter
from adapter_fusion.atomic import tree_bytes
from adapter_fusion.client import Client
from adapter_fusion.v1 import adapter_fusion_pb2 as pb
from adapter_fusion.server.app import ServerConfig
from adapter_fusion.server.served import ServiceLimits

from .conftest import bake, bump, code_of, compose, export, listing, load, serving, unload
from .test_hostile_paths import diff, snapshot

RE = grpc.StatusCode.RESOURCE_EXHAUSTED
MIX = pb.Recipe(method="linear", sources=[pb.Source(adapter="alpha", weight=0.5), pb.Source(adapter="beta", weight=0.5)])
STORE_QUOTA = 300_000  # room for the two sources and a few compositions of the tiny model (~40 KB each)


def test_the_store_quota_refuses_composes_and_loads_before_writing_until_room_is_freed(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    reads, store = tmp_path / "reads", tmp_path / "store"
    for source in tok_adapters[:3]:
        shutil.copytree(source, reads / source.name)
    config = ServerConfig(base_dir=tok_base, store_dir=store, adapter_roots=[reads], output_roots=[tmp_path / "out"], port=0, store_quota_bytes=STORE_QUOTA)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        load(client, "beta", "beta")
        composed, refused = [], None
        for i in range(40):  # bounded: the quota holds far fewer
            before = snapshot(store)
            code, details = code_of(lambda: compose(client, f"mix{i}", MIX))
            if code == RE:
                refused = (f"mix{i}", details)
                break
            assert code == grpc.StatusCode.OK, details
            composed.append(f"mix{i}")
            assert tree_bytes(store) <= STORE_QUOTA  # never past the quota, after any write
        assert refused is not None and composed, f"{len(composed)} compositions, none refused"
        name, details = refused
        assert "the adapter store" in details and "--store-quota-mb" in details and "UnloadAdapter" in details, details
        assert f"storing adapter {name!r} needs" in details, details
        assert diff(before, snapshot(store)) == []  # refused before a byte was written
        assert name not in listing(client)
        # a load is refused the same way: its copy in the store does not fit either
        code, details = code_of(lambda: load(client, "gamma", "gamma"))
        assert code == RE and "--store-quota-mb" in details, details
        assert "gamma" not in listing(client) and diff(before, snapshot(store)) == []
        # unloading frees room: the refused composition now fits
        unload(client, composed[0])
        compose(client, name, MIX)
        assert name in listing(client) and (store / name).is_dir() and tree_bytes(store) <= STORE_QUOTA
        bump("quota_store_writes_accepted", len(composed) + 3)
        bump("quota_store_writes_refused", 2)


def test_an_export_or_bake_over_the_output_quota_is_refused_before_writing(tmp_path: Path, tok_base: Path, tok_adapters: list[Path]) -> None:
    reads, writes = tmp_path / "reads", tmp_path / "writes"
    shutil.copytree(tok_adapters[0], reads / "alpha")
    one_export = saved_bytes(load_adapter(reads / "alpha"))
    limits = ServiceLimits(output_quota_bytes=one_export + one_export // 2)  # one export fits, two do not
    config = ServerConfig(base_dir=tok_base, store_dir=tmp_path / "store", adapter_roots=[reads], output_roots=[writes], port=0, service_limits=limits)
    with serving(config) as server, Client(server.address) as client:
        load(client, "alpha", "alpha")
        first = export(client, "alpha", "first")
        assert first.size_bytes == tree_bytes(writes / "first") <= one_export
        before = snapshot(writes)
        for rpc, call in (("ExportAdapter", lambda: export(client, "alpha", "second")), ("BakeModel", lambda: bake(client, "alpha", "baked"))):
            code, details = code_of(call)
            assert code == RE, f"{rpc}: {code.name} {details}"
            assert f"output root {writes}" in details and "--output-quota-mb" in details and "delete old exports" in details, details
            assert diff(before, snapshot(writes)) == [], rpc  # not even a temp dir
        shutil.rmtree(writes / "first")  # removed by hand: counted at the next write
        export(client, "alpha", "second")
        assert load_adapter(writes / "second").modules
        bump("quota_output_writes_refused", 2)
