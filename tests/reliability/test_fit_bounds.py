"""Data-aware compositions (learned, regmean, fisher) over the wire against hostile sizes: a
request inside every per-example cap that would take GBs or CPU-hours is refused before any
work, with the estimate and the bound in the message; one under the caps runs and stops within
about a second of its deadline. Each server runs as `adapter-fusion serve` in a subprocess whose
RSS a guard thread watches: over the guard's limit the server is killed and the test fails, so
a regression cannot take the machine down."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from adapter_fusion.client import Client, make_recipe
from adapter_fusion.data_merge import examples_cost as statistics_examples_cost
from adapter_fusion.fit_cost import FitBounds
from adapter_fusion.coefficient_fit import examples_cost as learned_examples_cost
from adapter_fusion.models import DEMO_ADAPTERS, default_base
from tests.reliability.conftest import ServeProcess, compose, load

GUARD_BYTES = 3 << 30  # over this the server is killed: the old learned fit passed it within ~12 s
WORDS = "river stone cloud paper table light water fire earth wind".split()  # one token each with SmolLM2's tokenizer


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def attack_examples(n: int, input_words: int = 1900, target_words: int = 500, seed: int = 0) -> list[tuple[str, str]]:
    """The attack's shape: ~1,900 input and ~500 target tokens each, inside every per-text cap."""
    rng = random.Random(seed)
    return [(text(rng, input_words), text(rng, target_words)) for _ in range(n)]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def rss_guard(proc: ServeProcess, limit: int = GUARD_BYTES) -> Iterator[dict]:
    """Watch the server's RSS every 20 ms; SIGKILL it above `limit`. Yields {"peak", "killed"}."""
    seen = {"peak": 0, "killed": False}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and proc.process.poll() is None:
            try:
                rss = rss_bytes(proc.process.pid)
            except OSError:
                return
            seen["peak"] = max(seen["peak"], rss)
            if rss > limit:
                seen["killed"] = True
                proc.process.send_signal(signal.SIGKILL)
                return
            done.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=5)
    assert not seen["killed"], f"the server's RSS passed {limit >> 20} MB: killed by the guard"


def start(tmp_path: Path, serve_processes: list[ServeProcess], base: Path, adapters: list[Path], *flags: str) -> tuple[ServeProcess, str]:
    args = ["serve", "--base", str(base), "--store", str(tmp_path / "store"), "--output-root", str(tmp_path / "out"), "--port", "0", *flags]
    for root in sorted({a.parent for a in adapters}):
        args += ["--adapter-root", str(root)]
    proc = ServeProcess(args, tmp_path / "serve.log", tmp_path)
    serve_processes.append(proc)
    address = proc.wait_serving()
    with Client(address) as client:
        for path in adapters:
            load(client, path.name, path)
    return proc, address


def refusal(client: Client, recipe, timeout: float = 120.0) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        compose(client, "refused", recipe, timeout=timeout)
    return info.value.code(), info.value.details(), time.monotonic() - start


def test_the_attack_shapes_are_refused_before_work_on_the_default_server(tmp_path: Path, serve_processes: list[ServeProcess]) -> None:
    """SmolLM2 with the default limits: learned over 2 sources, steps 1000, 256 examples of ~2,400
    tokens (1.2 MB), refused on arrival with RESOURCE_EXHAUSTED: its words alone x 1000 steps pass the
    1,000,000 cap; with one step, refused naming its estimated peak against the 4,096 MB budget; fisher with 128 such examples per
    source, under the cap, refused for its estimated peak (regmean's, which keeps no activations
    for a backward, is under the budget: it runs, bounded by the work cap). The server's RSS stays
    where a loaded SmolLM2 server is."""
    base = default_base()
    sources = [DEMO_ADAPTERS / "uppercase", DEMO_ADAPTERS / "reverse_words"]
    proc, address = start(tmp_path, serve_processes, base, sources)
    examples = attack_examples(256)
    bounds = FitBounds(max_memory_bytes=4096 << 20, max_work_tokens=1_000_000)
    learned = learned_examples_cost(base, examples, True, 1, bounds)
    words = sum(len([w for w in f"{i} {t}".split(" ") if w]) for i, t in examples)  # ASCII-space-separated, as the server counts
    with rss_guard(proc) as seen, Client(address) as client:
        before = rss_bytes(proc.process.pid)
        recipe = make_recipe("learned", {"uppercase": 0.5, "reverse_words": 0.5}, examples=examples, steps=1000)
        code, message, seconds = refusal(client, recipe)  # its words alone pass the work cap: refused on arrival
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert f"at least {words * 1000:,} example tokens" in message and "cap is 1,000,000" in message, message
        one_step = make_recipe("learned", {"uppercase": 0.5, "reverse_words": 0.5}, examples=examples, steps=1)
        code, message, seconds = refusal(client, one_step)  # under the work cap: its estimated peak is what is over
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert f"learned would need about {learned.memory_bytes / (1 << 20):,.0f} MB at its peak" in message, message
        assert "this server's fit budget is 4,096 MB" in message
        assert learned.work_tokens < 1_000_000 and "example tokens" not in message
        halves = {"uppercase": examples[:128], "reverse_words": examples[128:]}
        cost = statistics_examples_cost("fisher", base, [_load(s) for s in sources], list(halves.values()), True)
        code, message, _ = refusal(client, make_recipe("fisher", {"uppercase": 1.0, "reverse_words": 1.0}, source_examples=halves))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert f"fisher would need about {cost.memory_bytes / (1 << 20):,.0f} MB" in message, message
        assert cost.work_tokens < 1_000_000 and "example tokens" not in message  # 128 examples each: the memory is what is over
        grown = seen["peak"] - before
    assert grown < 1 << 30, f"refusing grew the server by {grown >> 20} MB (tokenising 1.2 MB of text is all it does)"
    assert "refused" not in {a.name for a in Client(address).list_adapters()}


def _load(path: Path):
    from adapter_fusion import load_adapter

    return load_adapter(path)


def test_the_work_cap_is_checked_on_exact_token_counts(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], serve_processes: list[ServeProcess]) -> None:
    """With --max-fit-work-tokens N: learned's tokens × steps and regmean's tokens over every
    source are counted exactly; N + 1 is refused with the figure, N itself runs."""
    examples = attack_examples(2, 30, 5)
    tokens = learned_examples_cost(tok_base, examples, True, 1, FitBounds()).work_tokens
    steps = 3
    proc, address = start(tmp_path, serve_processes, tok_base, tok_adapters[:2], "--max-fit-work-tokens", str(tokens * steps - 1))
    with rss_guard(proc), Client(address) as client:
        recipe = make_recipe("learned", {"alpha": 0.5, "beta": 0.5}, examples=examples, steps=steps)
        code, message, _ = refusal(client, recipe)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"learned would run {tokens * steps:,} example tokens through the model ({tokens:,} tokens × {steps} steps); this server's cap is {tokens * steps - 1:,}" in message, message
        compose(client, "fits", make_recipe("learned", {"alpha": 0.5, "beta": 0.5}, examples=examples, steps=steps - 1))
        per_source = {"alpha": examples * 2, "beta": examples * 2}  # counted as regmean runs them (targets as learned fits them)
        regmean = statistics_examples_cost("gram", tok_base, [_load(p) for p in tok_adapters[:2]], list(per_source.values()), True).work_tokens
        assert regmean > tokens * steps - 1 >= regmean // 2  # each source's tokens under N, together over
        code, message, _ = refusal(client, make_recipe("regmean", {"alpha": 1.0, "beta": 1.0}, source_examples=per_source))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"regmean would run {regmean:,} example tokens through the model (the tokens of 2 sources' examples)" in message, message


def test_a_fit_under_the_caps_stops_within_a_second_of_its_deadline(tmp_path: Path, tok_base: Path, tok_adapters: list[Path], serve_processes: list[ServeProcess]) -> None:
    """One learned step over 256 examples of ~2,000 tokens (about 0.5 M tokens, under the cap)
    takes tens of seconds; its deadline passes mid-step. The next data composition waits for the
    abandoned one to stop (they run one at a time): it takes at most ~1 s longer than alone."""
    proc, address = start(tmp_path, serve_processes, tok_base, tok_adapters[:2])
    small = make_recipe("regmean", {"alpha": 1.0}, source_examples={"alpha": [("one two", "ONE TWO")]})
    examples = attack_examples(256, 1990, 8)
    with rss_guard(proc), Client(address) as client:
        start_small = time.monotonic()
        compose(client, "small-0", small)
        alone = time.monotonic() - start_small
        recipe = make_recipe("learned", {"alpha": 0.5, "beta": 0.5}, examples=examples, steps=1)
        deadline = 15.0  # tokenising takes a few seconds here; the step then runs
        code, message, ended = refusal(client, recipe, timeout=deadline)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
        start_after = time.monotonic()
        compose(client, "small-1", small)
        after = time.monotonic() - start_after
    assert after - alone < 1.5, f"the abandoned fit ran on {after - alone:.2f} s after its deadline (small composition alone: {alone:.2f} s)"
    assert "refused" not in {a.name for a in Client(address).list_adapters()}
