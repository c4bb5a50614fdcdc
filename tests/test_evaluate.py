"""The evaluation harness: exact-match and loss arithmetic, batching, and a real adapter's gain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapter_fusion import load_adapter
from adapter_fusion.cli import app
from adapter_fusion.evaluate import evaluate
from adapter_fusion.models import tiny_llama, tiny_t5
from adapter_fusion.runtime import Runtime
from adapter_fusion.tasks import MIXTURES, TASKS, examples, number_words, user_message

DEMO = Path(__file__).parent.parent / "examples" / "adapters"


@pytest.fixture(scope="module")
def runtime(smollm2: Path) -> Runtime:
    return Runtime(smollm2)


def test_tasks_are_fixed_and_correct() -> None:
    assert examples("add", "test", 5) == examples("add", "test", 5)
    assert examples("add", "test", 5) != examples("add", "train", 5)
    assert number_words(0) == "zero" and number_words(45) == "forty-five" and number_words(700) == "seven hundred"
    assert number_words(913) == "nine hundred thirteen"
    assert len([t for t in TASKS.values() if not t.composite]) >= 8 and len([t for t in TASKS.values() if t.composite]) >= 3
    for task in TASKS:
        for ex in examples(task, "validation", 20):
            assert ex.input and ex.target
    with pytest.raises(KeyError, match="unknown task"):
        examples("nope")


def test_mixtures_interleave_their_parts_requests_each_with_its_own_instruction() -> None:
    """A mixture's example is one of its parts' examples, prefixed by that part's instruction (the
    user message is the input as is): what the parts' adapters were trained on, so their sum can answer."""
    for name, parts in MIXTURES.items():
        spec = TASKS[name]
        assert spec.composite and spec.parts == parts and spec.instruction == ""
        seen = set()
        for ex in examples(name, "test", 30):
            part = next(p for p in parts if ex.input.startswith(TASKS[p].instruction + "\n"))
            seen.add(part)
            assert user_message(name, ex) == ex.input
            plain = ex.input.split("\n", 1)[1]
            assert RULES[part](plain, ex.target), (name, part, plain, ex.target)
        assert seen == set(parts), name


RULES = {  # the parts' answers, written out
    "kv_json": lambda x, y: json.loads(y) == {k: int(v) for k, v in (p.split("=") for p in x.split(", "))},
    "uppercase": lambda x, y: y == x.upper(),
    "number_to_words": lambda x, y: y == number_words(int(x)),
    "words_to_number": lambda x, y: number_words(int(y)) == x,
    "add": lambda x, y: int(y) == sum(int(n) for n in x.split(" + ")),
    "last_word": lambda x, y: y == x.split()[-1],
}


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_target_nll_equals_transformers_own_loss(kind: str, smollm2: Path, tmp_path: Path) -> None:
    """Ours projects only the predicting positions and sums per row; transformers' loss is the reference."""
    if kind == "causal":
        runtime = Runtime(tiny_llama(tmp_path / "llama", tokenizer_from=smollm2))
    else:
        runtime = Runtime(tiny_t5(tmp_path / "t5", tokenizer_from=smollm2), targets=["q", "v"])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]  # unequal lengths: rows predict at different positions
    targets = [[20, 21], [22], [23, 24, 25, 26]]
    ours = runtime.target_nll(prompts, targets, [0, 0, 0])
    for row, (p, t) in enumerate(zip(prompts, targets)):
        with torch.no_grad():
            if kind == "causal":
                labels = torch.tensor([[-100] * len(p) + t])
                loss = runtime.model(input_ids=torch.tensor([p + t]), labels=labels).loss
            else:
                loss = runtime.model(input_ids=torch.tensor([p]), labels=torch.tensor([t])).loss
        torch.testing.assert_close(ours[row], loss * len(t), rtol=1e-5, atol=1e-5)


def test_accuracy_and_loss_arithmetic_and_batching(runtime: Runtime) -> None:
    upper = load_adapter(DEMO / "uppercase")
    one = evaluate(runtime, {"upper": upper}, ["uppercase"], limit=6, batch_size=6)[0]
    small = evaluate(runtime, {"upper": upper}, ["uppercase"], limit=6, batch_size=1)[0]
    assert one.n == 6 and one.outputs == small.outputs and one.accuracy == small.accuracy
    assert abs(one.mean_loss - small.mean_loss) < 1e-4
    expected = [ex.target for ex in examples("uppercase", "test", 6)]
    assert one.accuracy == sum(o.strip() == t for o, t in zip(one.outputs, expected)) / 6


def test_a_trained_adapter_beats_the_base_on_its_task(runtime: Runtime) -> None:
    adapters = {"base": None, "upper": load_adapter(DEMO / "uppercase"), "reverse": load_adapter(DEMO / "reverse_words")}
    scores = {(s.adapter, s.task): s for s in evaluate(runtime, adapters, ["uppercase", "reverse_words"], limit=12)}
    for name, task in (("upper", "uppercase"), ("reverse", "reverse_words")):
        assert scores[(name, task)].accuracy >= scores[("base", task)].accuracy + 0.4
        assert scores[(name, task)].mean_loss < scores[("base", task)].mean_loss / 2


def test_eval_command(tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, ["eval", "--adapter", str(DEMO / "uppercase"), "--task", "uppercase", "--limit", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert rows[0]["task"] == "uppercase" and rows[0]["n"] == 4
    bad = CliRunner().invoke(app, ["eval", "--task", "nope"])
    assert bad.exit_code == 2 and "unknown task(s) nope" in bad.output
