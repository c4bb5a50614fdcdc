"""kill -9 at random (seeded) moments during LoadAdapter, ComposeAdapter, ExportAdapter and BakeModel; 20 rounds.

Each round runs `adapter-fusion serve --base <tiny> --store S --adapter-root A --output-root O
--port 0` (the port is read from the serve log line), a client that loads,
composes, exports, bakes and sometimes unloads, recording every call that was acknowledged
(answered with success), then SIGKILLs the server while a call of that round's RPC (the four in
turn) is in flight: once its second call of the round has begun, after a seeded fraction of the
shortest such call so far (any round). What was in flight is read with the kill, under the client's lock, and
must be the call that then failed; every one of the four RPCs must have been struck at least once.
The server is then started again on the same store. After every restart:

* startup succeeded (the log names the port, health is SERVING) and the store holds no
  quarantined entry and no leftover temp/aside dir;
* every acknowledged adapter is listed (and no acknowledged unload came back), and each one
  acknowledged since the last check generates, greedily, exactly the tokens the same adapter
  (same source, same recipe) generated on the first server before any kill;
* every acknowledged export loads with `load_adapter`; every acknowledged bake has its config,
  every shard its manifest lists with that size and sha256, and every file of its index;
* no half-written output is visible under a final name: every directory in the output root whose
  name does not start with '.' is a complete export or bake.

At the end every acknowledged adapter is generated again. The first server is the real console
entry point (`python -m adapter_fusion.cli serve`); the others are forked from a pre-imported
parent that then runs the same `adapter_fusion.cli.main()` (conftest.ZYGOTE): a process start
costs ~1 s instead of ~8 s of imports, so 20 rounds fit the suite's time budget.

No --preload: the demo adapters fit only SmolLM2. (Until b14fbbd the server preloaded them on
any --base and a tiny base refused to start, exit 2: "adapter 'add' ... was made for another
base model"; an empty --preload cannot be given on the command line.)
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from adapter_fusion.adapters import load_adapter
from adapter_fusion.atomic import is_ours
from adapter_fusion.client import Client, make_recipe
from adapter_fusion.server.store import QUARANTINE

from .conftest import FIGURES, ForkedServe, ServeProcess, Zygote, bake, compose, export, greedy, listing, load, unload

ROUNDS = 20
RPCS = ["LoadAdapter", "ComposeAdapter", "ExportAdapter", "BakeModel"]  # each round kills during one, in turn
SEED = 20261123
TOKENS = 4
SOURCES = ["alpha", "beta", "gamma", "delta"]
SPECS = [  # recipe over two sources (a, b)
    ("linear", {"a": 0.6, "b": 0.4}, {}),
    ("svd", {"a": 1.0, "b": 0.5}, {"rank": 4}),
    ("ties", {"a": 0.7, "b": 0.3}, {"density": 0.5}),
    ("cat", {"a": 1.0, "b": -0.5}, {}),
]


def recipe_for(spec: int, a: str, b: str):
    method, weights, extra = SPECS[spec]
    rank = extra.get("rank")
    parameters = {k: v for k, v in extra.items() if k != "rank"}
    return make_recipe(method, {a: weights["a"], b: weights["b"]}, rank=rank, **parameters)


def pair_of(source: str) -> str:
    return SOURCES[(SOURCES.index(source) + 1) % len(SOURCES)]


# ---- what a complete output looks like --------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export(path: Path) -> None:
    assert is_ours(path), f"{path} has no marker"
    assert load_adapter(path).modules, f"{path} holds no modules"


def check_bake(path: Path) -> None:
    assert is_ours(path), f"{path} has no marker"
    assert (path / "config.json").is_file(), f"{path} has no config.json"
    manifest = json.loads((path / "adapter_fusion_bake.json").read_text())
    assert manifest["shards"], f"{path}: the manifest lists no shard"
    for shard, facts in manifest["shards"].items():
        assert (path / shard).stat().st_size == facts["bytes"], f"{path / shard}: size differs from the manifest"
        assert _sha256(path / shard) == facts["sha256"], f"{path / shard}: sha256 differs from the manifest"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for shard in set(json.loads(index.read_text())["weight_map"].values()):
            assert (path / shard).is_file(), f"{path}: {shard} is in the index but missing"


def check_output_root(outputs: Path, verified: set[str]) -> int:
    """Every visible (non-dot) directory is a complete export or bake (those not in `verified`
    yet are checked now and added: a complete output never changes afterwards). Returns how many."""
    count = 0
    for entry in sorted(outputs.iterdir()):
        if entry.name.startswith("."):
            continue  # temp dirs of interrupted writes: hidden by design
        if entry.name in verified:
            count += 1
            continue
        assert entry.is_dir() and not entry.is_symlink(), f"{entry}: not a directory"
        if (entry / "adapter_config.json").exists():
            check_export(entry)
        elif (entry / "config.json").exists() or (entry / "adapter_fusion_bake.json").exists():
            check_bake(entry)
        else:
            raise AssertionError(f"{entry}: a visible output that is neither a complete export nor a complete bake: {sorted(p.name for p in entry.iterdir())}")
        verified.add(entry.name)
        count += 1
    return count


def check_store(store: Path) -> None:
    assert not (store / QUARANTINE).exists(), f"entries were quarantined: {sorted(p.name for p in (store / QUARANTINE).iterdir())}"
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".deleted", ".old"))]
    assert not leftovers, f"recover() left {leftovers}"


# ---- the client that gets killed under -----------------------------------------------------------


class Workload:
    """Loads, composes, exports, bakes and unloads until a call fails (the kill); records acks."""

    def __init__(self, address: str, round_no: int, rng: random.Random, outputs: Path, took: dict[str, list[float]]) -> None:
        self.address, self.round, self.rng, self.outputs = address, round_no, rng, outputs
        self.took = took  # seconds each answered call took, per RPC, over every round
        self.acked: dict[str, tuple] = {}  # name -> what it must generate like: ("src", s) or ("mix", spec, a, b)
        self.unloaded: set[str] = set()
        self.uncertain: set[str] = set()  # sent, not acknowledged: may or may not exist after the kill
        self.exports: list[Path] = []
        self.bakes: list[Path] = []
        self.state = threading.Condition()  # guards what follows: the kill reads it under this lock
        self.in_flight = "none"
        self.calls = 0  # answered
        self.started: Counter = Counter()  # calls begun, per RPC
        self.ended: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _call(self, op: str, fn):
        with self.state:
            self.in_flight = op
            self.started[op] += 1
            self.state.notify_all()
        began = time.monotonic()
        result = fn()
        with self.state:
            self.took.setdefault(op, []).append(time.monotonic() - began)
            self.calls += 1
            self.in_flight = "between calls"
        return result

    def second_call_began(self, op: str, timeout: float = 60) -> float:
        """Wait until the round's second call of `op` has begun; the shortest one answered so far."""
        with self.state:
            self.state.wait_for(lambda: self.started[op] >= 2 or self.ended is not None, timeout)
            assert self.started[op] >= 2, f"the client never began a second {op}: {self.ended}"
            return min(self.took[op])

    def _run(self) -> None:
        r = self.round
        try:
            with Client(self.address) as client:
                for i in range(200):  # bounded; a kill ends it far sooner
                    first = self.rng.choice(SOURCES)
                    second_source = pair_of(first)
                    a, b = f"r{r}l{i}a", f"r{r}l{i}b"
                    for name, source in ((a, first), (b, second_source)):
                        self.uncertain.add(name)
                        self._call("LoadAdapter", lambda: load(client, name, source, timeout=30))
                        self.uncertain.discard(name)
                        self.acked[name] = ("src", source)
                    spec = self.rng.randrange(len(SPECS))
                    mixed = f"r{r}c{i}"
                    self.uncertain.add(mixed)
                    self._call("ComposeAdapter", lambda: compose(client, mixed, recipe_for(spec, a, b), timeout=30))
                    self.uncertain.discard(mixed)
                    self.acked[mixed] = ("mix", spec, first, second_source)
                    target = self.outputs / f"r{r}e{i}"
                    self._call("ExportAdapter", lambda: export(client, mixed, target, timeout=30))
                    self.exports.append(target)
                    if i % 2 == 0:
                        target = self.outputs / f"r{r}b{i}"
                        messages = self._call("BakeModel", lambda: bake(client, a, target, timeout=60))
                        assert messages and messages[-1].manifest_json, "a bake ended without its manifest"
                        self.bakes.append(target)
                    if i > 0 and self.rng.random() < 0.5:
                        gone = f"r{r}l{i - 1}b"
                        self.acked.pop(gone, None)
                        self.uncertain.add(gone)
                        self._call("UnloadAdapter", lambda: unload(client, gone, timeout=30))
                        self.uncertain.discard(gone)
                        self.unloaded.add(gone)
        except grpc.RpcError as error:
            self.ended = f"{error.code().name} during {self.in_flight}"
        except Exception as error:  # anything else is a test failure, reported by the main thread
            self.ended = f"unexpected {type(error).__name__}: {error}"
        finally:
            with self.state:
                self.ended = self.ended or "finished"
                self.state.notify_all()


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], serve_processes: list[ServeProcess]) -> None:
    adapters, store, outputs = tmp_path / "adapters", tmp_path / "store", tmp_path / "outputs"
    for source in tok_adapters:
        shutil.copytree(source, adapters / source.name)
    args = [
        "serve", "--base", str(tok_base), "--store", str(store), "--adapter-root", str(adapters), "--output-root", str(outputs),
        "--port", "0",
    ]
    zygote = Zygote(tmp_path, tmp_path / "zygote.log")  # imports while the first server starts
    rng = random.Random(SEED)
    acked: dict[str, tuple] = {}
    unloaded: set[str] = set()
    exports: list[Path] = []
    bakes: list[Path] = []
    kill_points: Counter = Counter()  # what was in flight at each kill, read with it
    kills = 0  # SIGKILLs that struck a running server
    lost = 0  # acknowledged adapters missing after a restart
    rounds = 0
    took: dict[str, list[float]] = {}
    checked_generations = 0
    verified: set[str] = set()
    references: dict[tuple, tuple[int, ...]] = {}
    try:
        first = ServeProcess(args, tmp_path / "serve-0.log", tmp_path)  # the real entry point
        serve_processes.append(first)
        address = first.wait_serving()
        with Client(address) as client:  # what each source and recipe generates, before any kill
            for source in SOURCES:
                load(client, f"ref-{source}", source)
                references[("src", source)] = greedy(client, f"ref-{source}", TOKENS)
                acked[f"ref-{source}"] = ("src", source)
            for source in SOURCES:
                for spec in range(len(SPECS)):
                    name = f"ref-{spec}-{source}"
                    compose(client, name, recipe_for(spec, f"ref-{source}", f"ref-{pair_of(source)}"))
                    references[("mix", spec, source, pair_of(source))] = greedy(client, name, TOKENS)
                    acked[name] = ("mix", spec, source, pair_of(source))
        assert len(set(references.values())) > len(references) // 2, "the references hardly differ: a weak probe"
        running: ServeProcess | ForkedServe = first
        for round_no in range(1, ROUNDS + 1):
            target = RPCS[(round_no - 1) % len(RPCS)]
            work = Workload(address, round_no, rng, outputs, took)
            work.thread.start()
            shortest = work.second_call_began(target)
            delay = rng.uniform(0.05, 0.8) * shortest
            time.sleep(delay)  # a seeded point inside the second call
            with work.state:  # the client cannot begin or finish a call while the kill strikes
                point, answered = work.in_flight, work.calls
                was_running = running.alive()
                running.kill()  # SIGKILL
                kills += was_running and not running.alive()
            work.thread.join(timeout=60)
            assert not work.thread.is_alive(), "the client did not notice the kill"
            assert work.ended is not None and not work.ended.startswith(("unexpected", "finished")), work.ended
            if work.calls > answered:  # its reply was already on the way as the kill fell
                point = "answered as the kill fell"
            else:
                assert work.ended.endswith(f"during {point}"), f"round {round_no}: killed during {point}, but the client failed {work.ended}"
            kill_points[point] += 1
            fresh = {n: v for n, v in work.acked.items()}
            acked.update(fresh)
            unloaded |= work.unloaded
            exports += work.exports
            bakes += work.bakes

            started = time.monotonic()
            server = zygote.spawn(args, tmp_path / f"serve-{round_no}.log")
            address = server.wait_serving()  # startup never fails
            startup = time.monotonic() - started
            check_store(store)
            with Client(address) as client:
                names = set(listing(client))
                missing = sorted(set(acked) - names)
                lost += len(missing)
                assert not missing, f"round {round_no}: acknowledged adapters lost after kill -9: {missing}"
                back = sorted(unloaded & names)
                assert not back, f"round {round_no}: acknowledged unloads came back: {back}"
                for name, kind in sorted(fresh.items()):
                    assert greedy(client, name, TOKENS) == references[kind], f"round {round_no}: {name} ({kind}) generates differently after the restart"
                    checked_generations += 1
            for path in exports:
                assert path.is_dir(), f"acknowledged export {path} is missing"
            for path in bakes:
                assert path.is_dir(), f"acknowledged bake {path} is missing"
            visible = check_output_root(outputs, verified)  # complete, acknowledged or not
            checks = time.monotonic() - started - startup
            rounds += 1
            print(f"round {round_no}: {target}'s turn, killed {delay * 1000:.0f} ms into a call (shortest {shortest * 1000:.0f} ms), during: {point}; {work.calls} acknowledged calls; "
                  f"{len(acked)} adapters, {len(exports)} exports, {len(bakes)} bakes acknowledged so far; {visible} visible outputs complete; restart {startup:.1f} s, checks {checks:.1f} s")
            running = server

        running.kill()
        final = zygote.spawn(args, tmp_path / "serve-final.log")
        address = final.wait_serving()
        check_store(store)
        with Client(address) as client:
            names = set(listing(client))
            lost += len(set(acked) - names)
            assert not (set(acked) - names) and not (unloaded & names)
            # each was compared after the restart that followed its acknowledgement; a seeded
            # sample again after all the kills (generating all of them would dominate the run)
            for name in rng.sample(sorted(acked), min(30, len(acked))):
                assert greedy(client, name, TOKENS) == references[acked[name]], f"{name} ({acked[name]}) generates differently at the end"
                checked_generations += 1
        verified.clear()
        check_output_root(outputs, verified)  # everything once more, from scratch
        assert {p.name for p in exports + bakes} <= verified
        final.signal(15)
        assert final.wait_gone(60), "the final server did not stop on SIGTERM"
        struck = set(RPCS) - set(kill_points)
        assert not struck, f"no kill fell during {sorted(struck)}: kill points {dict(kill_points)}"
    finally:
        zygote.close()
        FIGURES.update(  # what was measured, also when a check failed
            kill_rounds=rounds,
            kills=kills,
            kill_points=dict(sorted(kill_points.items())),
            kill_acknowledged_adapters_checked=len(acked),
            kill_acknowledged_unloads_checked=len(unloaded),
            kill_generations_compared=checked_generations,
            kill_exports_verified=len(exports),
            kill_bakes_verified=len(bakes),
            kill_adapters_lost=lost,
        )
