"""The supervised engine on a real (tiny) model: a fault ends every request it holds and the
engine restarts or gives up; stopping fails what is queued; a cancelled job never kills the
thread. Faults are injected into our own model's forward."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapter_fusion import load_adapter
from adapter_fusion.engines.builtin import Engine, Event, Limits
from adapter_fusion.errors import EngineFaultError, LimitExceededError, RequestCancelledError, ShuttingDownError, UnavailableError
from adapter_fusion.entries import AdapterInfo
from adapter_fusion.decoding import Request
from adapter_fusion.runtime import Runtime

PROMPT = list(range(20, 32))


class Stream:
    """What one request's callback received."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None or event.error is not None:
            self.ended.set()

    @property
    def error(self) -> Exception | None:
        return self.events[-1].error if self.events else None

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]


class Fault:
    """A forward pre-hook on the model: raise while `armed`, block while `held`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.armed = False
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.entered.set()
        self.release.wait(timeout=30)
        if self.armed:
            raise RuntimeError("injected fault")


class States:
    """Every state the engine reported through `on_state` (`seen`, in order); awaitable."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = threading.Condition()

    def __call__(self, state: str) -> None:
        with self.changed:
            self.seen.append(state)
            self.changed.notify_all()

    def wait_for(self, condition, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: condition(self.seen), timeout)


@pytest.fixture()
def runtime(tiny_chat_base: Path) -> Runtime:
    return Runtime(tiny_chat_base)


@pytest.fixture()
def engine(runtime: Runtime) -> Iterator[Engine]:
    states = States()
    engine = Engine(runtime, Limits(restart_delay_s=0.2, max_faults=2, fault_window_s=60), on_state=states)
    engine.states = states  # type: ignore[attr-defined]
    engine.start()
    yield engine
    engine.stop()


def generate(engine: Engine, tokens: int = 6, adapter: str | None = None) -> Stream:
    stream = Stream()
    engine.submit(Request(prompt_ids=list(PROMPT), max_new_tokens=tokens), adapter, stream)
    return stream


def test_a_fault_ends_every_request_then_the_engine_serves_again(engine: Engine) -> None:
    before = generate(engine)
    assert before.ended.wait(10) and before.error is None
    fault = Fault(engine.runtime.model)
    fault.release.clear()
    running = [generate(engine, tokens=50) for _ in range(3)]
    assert fault.entered.wait(10)  # the batch is in its forward
    queued = generate(engine)
    job = engine.score(None, [PROMPT], [[5, 6]])
    fault.armed = True
    fault.release.set()
    started = time.monotonic()
    for stream in [*running, queued]:
        assert stream.ended.wait(1.0), "a request held by a faulted engine must end within a second"
        assert isinstance(stream.error, EngineFaultError) and "error id" in str(stream.error)
    with pytest.raises(EngineFaultError):
        job.future.result(timeout=1.0)
    assert time.monotonic() - started < 1.0
    fault.armed = False
    assert engine.states.wait_for(lambda states: states[-1:] == ["serving"] and len(states) > 1, timeout=5)
    assert engine.states.seen == ["serving", "restarting", "serving"] and engine.stats["faults"] == 1
    after = generate(engine)
    assert after.ended.wait(10) and after.error is None and after.tokens == before.tokens
    fault.handle.remove()


def test_requests_during_a_restart_are_refused_not_queued(runtime: Runtime) -> None:
    engine = Engine(runtime, Limits(restart_delay_s=5.0))
    engine.start()
    fault = Fault(engine.runtime.model)
    fault.armed = True
    try:
        failed = generate(engine)
        assert failed.ended.wait(2) and isinstance(failed.error, EngineFaultError)
        assert engine.state == "restarting"  # set before the requests are ended
        with pytest.raises(UnavailableError, match="restarting"):
            generate(engine)
    finally:
        fault.handle.remove()
        started = time.monotonic()
        engine.stop()  # interrupts the restart pause
        assert time.monotonic() - started < 2


def test_repeated_faults_leave_the_engine_failed_and_every_call_refused(engine: Engine) -> None:
    fault = Fault(engine.runtime.model)
    fault.armed = True
    for restarts in range(2):
        assert engine.states.wait_for(lambda states: states.count("serving") == restarts + 1)
        stream = generate(engine)
        assert stream.ended.wait(2) and isinstance(stream.error, EngineFaultError)
    assert engine.states.wait_for(lambda states: states[-1] == "failed", timeout=2)
    assert engine.state == "failed" and engine.states.seen == ["serving", "restarting", "serving", "failed"]
    with pytest.raises(UnavailableError, match="down after repeated faults"):
        generate(engine)
    with pytest.raises(UnavailableError):
        engine.score(None, [PROMPT], [[5]])
    fault.handle.remove()


def test_stop_fails_what_is_queued_and_held(engine: Engine) -> None:
    fault = Fault(engine.runtime.model)
    fault.release.clear()
    held = generate(engine, tokens=50)
    assert fault.entered.wait(10)
    queued = generate(engine)
    job = engine.score(None, [PROMPT], [[5, 6]])
    stopper = threading.Thread(target=engine.stop)
    with engine.scheduler.wake:  # stop() notifies it once the state is "stopped" (the engine thread is held in its forward)
        stopper.start()
        assert engine.scheduler.wake.wait_for(lambda: engine.state == "stopped", timeout=10)
    fault.release.set()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    for stream in (held, queued):
        assert stream.ended.wait(1) and isinstance(stream.error, ShuttingDownError)
    with pytest.raises(ShuttingDownError):
        job.future.result(timeout=1)
    with pytest.raises(ShuttingDownError):
        generate(engine)
    fault.handle.remove()


def test_a_job_cancelled_by_its_caller_never_harms_the_engine(engine: Engine) -> None:
    """The bug this guards: a Score whose client gave up had its future cancelled, and the
    engine's set_result on it raised and ended the engine thread."""
    fault = Fault(engine.runtime.model)
    fault.release.clear()
    blocker = generate(engine, tokens=3)
    assert fault.entered.wait(10)
    cancelled = engine.score(None, [PROMPT], [[5, 6]])
    assert cancelled.future.cancel()  # what asyncio does when a deadline passes while it waits
    abandoned = engine.score(None, [PROMPT] * 70, [[5, 6]] * 70)  # 3 chunks of max_batch rows
    abandoned.cancelled.set()
    fault.release.set()
    with pytest.raises(RequestCancelledError):
        abandoned.future.result(timeout=10)
    assert blocker.ended.wait(10) and blocker.error is None
    later = generate(engine)
    assert later.ended.wait(10) and later.error is None and engine.stats["faults"] == 0
    fault.handle.remove()


def test_a_job_out_of_memory_fails_alone(engine: Engine) -> None:
    """A job whose work runs the device out of memory (too many or too long examples) fails with
    RESOURCE_EXHAUSTED's error; it is not an engine fault: nothing restarts, streams go on."""

    def work(route, job) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    job = engine.run(None, work)
    with pytest.raises(LimitExceededError, match="the device ran out of memory for this work; send fewer or shorter examples"):
        job.future.result(timeout=10)
    later = generate(engine)
    assert later.ended.wait(10) and later.error is None and engine.stats["faults"] == 0


def test_tokens_go_out_before_the_next_forward(engine: Engine) -> None:
    """A row's token reaches its client before the batch's next forward runs, not one step later:
    at each forward of the model (its own pre-hook) the client's callback has already received
    every token chosen before it (the greedy text of this prompt never needs holding back)."""
    stream = Stream()
    request = Request(prompt_ids=list(PROMPT), max_new_tokens=4)
    at_forward: list[tuple[int, int]] = []  # (tokens chosen, tokens the client holds) as each forward starts
    handle = engine.runtime.model.register_forward_pre_hook(lambda module, args: at_forward.append((len(request.output_ids), len(stream.tokens))))
    try:
        engine.submit(request, None, stream)
        assert stream.ended.wait(10) and stream.error is None
    finally:
        handle.remove()
    assert at_forward == [(0, 0), (1, 1), (2, 2), (3, 3)]  # the prefill, then one forward per token but the last
    assert stream.tokens == request.output_ids and len(stream.tokens) == 4


def test_a_full_queue_refuses_and_holds_nothing(runtime: Runtime, tiny_adapters: list[Path]) -> None:
    """A generation refused because the queue is full is refused before it holds or even looks up
    its adapter: once the accepted ones end, the adapter can be evicted."""
    engine = Engine(runtime, Limits(max_queue=1, max_batch=1), reload=lambda name: load_adapter(tiny_adapters[0], name))
    adapter = load_adapter(tiny_adapters[0], "a")
    engine.registry.register(adapter, AdapterInfo.of(adapter, "a", pinned=False))
    engine.start()
    fault = Fault(engine.runtime.model)
    fault.release.clear()
    try:
        running = generate(engine, adapter="a")
        assert fault.entered.wait(10)  # in the batch: the queue is empty again
        queued = generate(engine, adapter="a")
        with pytest.raises(LimitExceededError, match=r"the queue is full \(1 waiting requests\); retry later"):
            generate(engine, adapter="a")
        with pytest.raises(LimitExceededError, match="the queue is full"):  # refused before any name is looked up
            generate(engine, adapter="no-such-adapter")
        fault.release.set()
        assert running.ended.wait(10) and queued.ended.wait(10) and queued.error is None
        assert engine.registry.evict("a")  # no reference left behind
    finally:
        fault.release.set()
        fault.handle.remove()
        engine.stop()


def test_the_budget_counts_slot_buffers(runtime: Runtime, tiny_adapters: list[Path]) -> None:
    """A pinned adapter counts with the slot it will need from the moment it is pinned: one whose
    factors fit but whose slot would not is refused then, not accepted and refused at every request."""
    adapter = load_adapter(tiny_adapters[0], "a")
    slot_cost = runtime.slot_bytes([[adapter]])
    # every layer it touches holds the bank's preallocated columns (float32), whatever the rank
    assert slot_cost == runtime.slots.capacity * 4 * sum(o + i for o, i in adapter.shapes.values())
    engine = Engine(runtime, Limits(memory_budget_bytes=adapter.size_bytes + slot_cost - 1))
    for pinned in (True, False):  # unpinned too: it could never be served, whatever were evicted
        with pytest.raises(LimitExceededError, match="could never be served.*memory budget"):
            engine.registry.register(adapter, AdapterInfo.of(adapter, "a", pinned=pinned))
        assert not engine.registry.has("a")
    fits = Engine(runtime, Limits(memory_budget_bytes=adapter.size_bytes + slot_cost))
    fits.registry.register(adapter, AdapterInfo.of(adapter, "a", pinned=True))
    fits.start()
    try:
        stream = generate(fits, adapter="a")
        assert stream.ended.wait(10) and stream.error is None  # what was accepted is served
    finally:
        fits.stop()
    fits.registry.register_group("g", [adapter])  # shares the factors and fits the same columns: not counted twice


def test_a_hidden_composition_that_cannot_fit_is_refused_not_dropped(runtime: Runtime, tiny_adapters: list[Path]) -> None:
    """An entry with no copy in the store (an inline composition) is never the one the budget
    evicts as it arrives: that would drop its name at once, and its request would find nothing."""
    busy, composed = load_adapter(tiny_adapters[0], "busy"), load_adapter(tiny_adapters[1], "composed")
    slot = runtime.slot_bytes([[busy]])
    engine = Engine(runtime, Limits(memory_budget_bytes=busy.size_bytes + slot + composed.size_bytes - 1))
    engine.registry.register(busy, AdapterInfo.of(busy, "b", pinned=False))
    engine.registry.route_for(engine.registry.hold("busy"))  # in use, in its slot: nothing may evict it
    # servable on its own (under the budget with its slot), but not beside the busy one
    assert composed.size_bytes + runtime.slot_bytes([[composed]]) <= engine.registry.policy.limit_bytes
    with pytest.raises(LimitExceededError, match="memory budget"):
        engine.registry.add_inline(composed, AdapterInfo.of(composed, "recipe", pinned=False))
    assert not engine.registry.has("composed") and engine.registry.stats["evictions"] == 0



def test_a_split_score_equals_the_unsplit_one(runtime: Runtime) -> None:
    """Scoring in token-bounded pieces gives the NLLs of one whole batch, within fp32 arithmetic."""
    prompts = [list(range(20, 20 + n)) for n in (12, 40, 7, 25, 60, 3)]
    targets = [[5, 6, 7][: 1 + i % 3] for i in range(len(prompts))]
    results = []
    for budget in (100_000, 64):
        engine = Engine(runtime, Limits(max_job_tokens=budget))
        engine.start()
        try:
            job = engine.score(None, prompts, targets)
            results.append((len(job.pieces), job.future.result(timeout=30)))
        finally:
            engine.stop()
    (whole_pieces, whole), (split_pieces, split) = results
    assert (whole_pieces, split_pieces) == (1, 5)  # rows of 13, 42, 10 + 26, 62 and 6 tokens (padded width x rows <= 64)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_cancelling_a_call_drops_all_its_queued_jobs_at_once(engine: Engine) -> None:
    fault = Fault(engine.runtime.model)
    fault.release.clear()
    blocker = generate(engine, tokens=3)
    assert fault.entered.wait(10)  # the engine thread is inside a forward: nothing queued can run
    call = threading.Event()
    jobs = [engine.score(None, [PROMPT] * 4, [[5, 6]] * 4, cancelled=call) for _ in range(3)]
    other = engine.score(None, [PROMPT], [[5, 6]])
    engine.cancel(call)
    for job in jobs:  # ended now, while the engine is still held in its forward
        with pytest.raises(RequestCancelledError, match="the client cancelled or its deadline passed"):
            job.future.result(timeout=0)
    assert not other.future.done()
    with pytest.raises(RequestCancelledError):
        engine.score(None, [PROMPT], [[5, 6]], cancelled=call)  # a job of a call already cancelled is refused
    fault.release.set()
    assert other.future.result(timeout=10).shape == (1,)
    assert blocker.ended.wait(10) and blocker.error is None
    fault.handle.remove()
