"""LoraHub weight search: recovers planted weights, reproducible, batched candidates, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapter_fusion import load_adapter, merge
from adapter_fusion.errors import IncompatibleAdaptersError, RecipeError
from adapter_fusion.lorahub import SearchCancelled, SearchSettings, lorahub_search, runtime_objective, search
from adapter_fusion.models import tiny_t5
from adapter_fusion.runtime import Runtime
from tests.conftest import PLANTED, write_peft_adapter

def test_search_recovers_planted_weights(planted) -> None:
    runtime, adapters, examples = planted
    result = lorahub_search(runtime, adapters, examples, budget=80, seed=0, l1=0.0, chat=False)
    assert np.abs(np.array(result.weights) - PLANTED).max() < 0.1, result.weights
    assert len(result.losses) == 80 and result.best_loss == min(result.losses)
    objective = runtime_objective(runtime, adapters, examples, chat=False)
    assert result.best_loss <= objective(np.array([PLANTED]))[0] + 1e-3
    assert result.adapter is not None and result.adapter.extra["lorahub"]["weights"] == result.weights


def test_same_seed_same_result_and_batched_candidates(planted) -> None:
    runtime, adapters, examples = planted
    first = lorahub_search(runtime, adapters, examples, budget=12, seed=3, chat=False)
    again = lorahub_search(runtime, adapters, examples, budget=12, seed=3, chat=False)
    assert first.weights == again.weights and first.losses == again.losses
    objective = runtime_objective(runtime, adapters, examples, chat=False)
    W = np.array([[0.1, 0.2, 0.3], [-1.0, 0.5, 0.0], PLANTED])
    together = objective(W)  # three candidates in one forward pass
    alone = [objective(W[i : i + 1])[0] for i in range(3)]
    assert np.allclose(together, alone, rtol=1e-4)
    parallel = lorahub_search(runtime, adapters, examples, budget=12, seed=3, parallel=4, chat=False)
    assert len(parallel.losses) == 12


def test_factor_linear_objective_matches_the_merged_adapter(planted) -> None:
    runtime, adapters, examples = planted
    objective = runtime_objective(runtime, adapters, examples, rule="factor_linear", chat=False)
    w = [0.5, 0.3, -0.2]
    loss = objective(np.array([w]))[0]
    runtime.set_slots([[merge(adapters, "factor_linear", w).adapter]])
    prompts = [runtime.text_ids(x) for x, _ in examples]
    targets = [runtime.text_ids(y) for _, y in examples]
    direct = float(runtime.target_nll(prompts, targets, [1] * len(examples)).sum()) / sum(map(len, targets))
    assert abs(loss - direct) < 1e-4


def test_search_plumbing_on_a_known_objective() -> None:
    target = np.array([0.5, -1.0, 1.2])

    def quadratic(W: np.ndarray) -> list[float]:
        return [float(((w - target) ** 2).sum()) for w in W]

    seen = []
    result = search(quadratic, 3, SearchSettings(budget=200, optimizer="NGOpt", l1=0.0), on_progress=seen.append)
    assert np.abs(np.array(result.weights) - target).max() < 0.1
    assert seen[-1].evaluations == 200 and seen[-1].best_loss == result.best_loss
    assert all(-1.5 <= w <= 1.5 for w in result.weights)
    failing = search(lambda W: [float("nan")] * len(W), 2, SearchSettings(budget=5))
    assert failing.losses == [1e6] * 5  # non-finite losses are reported, not raised


def test_cancellation(planted) -> None:
    runtime, adapters, examples = planted
    calls = []
    with pytest.raises(SearchCancelled):
        lorahub_search(runtime, adapters, examples, budget=40, chat=False, on_progress=calls.append, should_stop=lambda: len(calls) >= 3)
    assert len(calls) == 3


def test_bad_inputs(planted, tmp_path: Path) -> None:
    runtime, adapters, examples = planted
    with pytest.raises(RecipeError, match="at least one example"):
        lorahub_search(runtime, adapters, [])
    with pytest.raises(RecipeError, match="unknown nevergrad optimizer 'Nope'"):
        lorahub_search(runtime, adapters, examples, optimizer="Nope")
    for budget in (0, 10**6):
        with pytest.raises(RecipeError, match="budget must be in 1..10000"):
            lorahub_search(runtime, adapters, examples, budget=budget)
    with pytest.raises(RecipeError, match="needs 1..256 adapters"):
        lorahub_search(runtime, [], examples)
    rank8 = load_adapter(write_peft_adapter(runtime.base_dir, tmp_path / "r8", seed=9, r=8))
    with pytest.raises(IncompatibleAdaptersError, match="factor_linear needs equal ranks"):
        runtime_objective(runtime, [adapters[0], rank8], examples, rule="factor_linear")


def test_seq2seq_models_are_searched_too(smollm2: Path, tmp_path: Path) -> None:
    base = tiny_t5(tmp_path / "t5", tokenizer_from=smollm2)
    adapters = [load_adapter(write_peft_adapter(base, tmp_path / f"t{i}", seed=i, targets=["q", "v"], task_type="SEQ_2_SEQ_LM")) for i in range(2)]
    runtime = Runtime(base, targets=["q", "v"])
    assert runtime.is_seq2seq
    result = lorahub_search(runtime, adapters, [("stone cloud", "paper"), ("river light", "table")], budget=6)
    assert len(result.losses) == 6 and np.isfinite(result.best_loss)


def test_lorahub_command(planted, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from adapter_fusion.cli import app

    runtime, adapters, examples = planted
    dirs = []
    for i, adapter in enumerate(adapters):
        from adapter_fusion import save_adapter

        dirs += ["--adapters", str(save_adapter(adapter, tmp_path / f"s{i}"))]
    data = tmp_path / "examples.jsonl"
    data.write_text("\n".join(json.dumps({"input": x, "output": y}) for x, y in examples))
    args = ["lorahub", *dirs, "--examples", str(data), "--output", str(tmp_path / "out"), "--base", str(runtime.base_dir), "--budget", "6", "--raw"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "after 6 evaluations" in result.output and (tmp_path / "out" / "adapter_config.json").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    data.write_text('{"input": "x"}')
    bad = CliRunner().invoke(app, [arg if arg != str(tmp_path / "out") else str(tmp_path / "o2") for arg in args])
    assert bad.exit_code == 2 and "needs 'input' and 'target'" in bad.output
