"""Exact-match accuracy and target loss of adapters on the task suite, in mixed batches.

The base model is loaded once (`Runtime`); every adapter to judge is installed as a slot and all
(adapter, task, example) rows are generated together in batches, each row routed to its own
adapter: judging ten adapters costs about as much as judging one ten times as long.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adapter_fusion.adapters import Adapter
from adapter_fusion.runtime import Runtime
from adapter_fusion.tasks import Example, examples, user_message
from adapter_fusion.decoding import greedy


@dataclass(frozen=True)
class Score:
    adapter: str
    task: str
    n: int
    accuracy: float  # exact match after stripping whitespace
    mean_loss: float  # mean negative log-likelihood per target token
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Row:
    adapter: str
    task: str
    example: Example
    slot: int


def evaluate(
    runtime: Runtime,
    adapters: Mapping[str, Adapter | None],
    tasks: list[str],
    split: str = "test",
    limit: int = 50,
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Score]:
    """Score every adapter (None = the base model) on every task; one Score per pair."""
    named = [(name, a) for name, a in adapters.items() if a is not None]
    runtime.set_slots([[a] for _, a in named])
    slot_of = {name: i + 1 for i, (name, _) in enumerate(named)}
    rows = [
        _Row(name, task, ex, slot_of.get(name, 0))
        for name in adapters
        for task in tasks
        for ex in examples(task, split, limit)
    ]
    prompts = [runtime.chat_ids(user_message(r.task, r.example)) for r in rows]
    targets = [runtime.text_ids(r.example.target) for r in rows]
    texts: list[str] = []
    nll: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        batch_rows = [r.slot for r in rows[chunk]]
        longest = max(len(t) for t in targets[chunk])
        outputs = greedy(runtime, prompts[chunk], batch_rows, max_new_tokens=longest + 4)
        texts += [runtime.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        nll += runtime.target_nll(prompts[chunk], targets[chunk], batch_rows).tolist()
        if on_batch is not None:
            on_batch(min(start + batch_size, len(rows)), len(rows))
    scores = []
    for name in adapters:
        for task in tasks:
            picked = [i for i, r in enumerate(rows) if r.adapter == name and r.task == task]
            correct = sum(texts[i].strip() == rows[i].example.target for i in picked)
            tokens = sum(len(targets[i]) for i in picked)
            scores.append(
                Score(name, task, len(picked), correct / len(picked), sum(nll[i] for i in picked) / tokens, tuple(texts[i] for i in picked))
            )
    return scores
