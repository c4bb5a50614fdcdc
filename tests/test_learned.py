"""`learned`: per-layer column scales compute exactly the per-module Σ cᵢΔWᵢ, their gradient is
the loss's, the fit recovers planted coefficients, and the recipe / CLI / refusals a user meets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from adapter_fusion import load_adapter, merge
from adapter_fusion.cli import app
from adapter_fusion.errors import RecipeError
from adapter_fusion.coefficient_fit import CoefficientFit, coefficient_groups, fit_coefficients, merge_learned
from adapter_fusion.lorahub import SearchCancelled, lorahub_search, runtime_objective, tokenize_examples
from adapter_fusion.models import tiny_t5
from adapter_fusion.recipe import parse_recipe
from adapter_fusion.runtime import Runtime
from tests.conftest import PLANTED, write_peft_adapter

runner = CliRunner()


def per_module_reference(adapters, coefficients: dict[str, list[float]]):
    """Σ c[module, i]·ΔWᵢ written as one adapter: each source's modules pre-scaled, then summed by `cat`."""
    scaled = [
        dataclasses.replace(a, modules={path: d.scaled(coefficients[path][i]) for path, d in a.modules.items()})
        for i, a in enumerate(adapters)
    ]
    return merge(scaled, "cat").adapter


def scales_for(runtime: Runtime, coefficients: dict[str, list[float]], requires_grad: bool = False) -> dict[str, torch.Tensor]:
    widths = torch.tensor(runtime.slots.placements[1].widths)
    return {path: torch.tensor(c, requires_grad=requires_grad).repeat_interleave(widths) for path, c in coefficients.items()}


def nll_of(runtime: Runtime, examples, scales=None, differentiable: bool = False) -> torch.Tensor:
    prompts, targets = tokenize_examples(runtime, examples, chat=False)
    with runtime.scaled(scales or {}):
        return runtime.target_nll(prompts, targets, [1] * len(prompts), differentiable=differentiable).sum() / sum(map(len, targets))


def test_column_scales_are_the_per_module_weighted_sum(planted) -> None:
    runtime, adapters, examples = planted
    rng = np.random.default_rng(0)
    coefficients = {path: rng.uniform(-1, 1, len(adapters)).tolist() for path in adapters[0].modules}
    runtime.set_slots([adapters])
    scaled = float(nll_of(runtime, examples, scales_for(runtime, coefficients)))
    runtime.set_slots([[per_module_reference(adapters, coefficients)]])
    reference = float(nll_of(runtime, examples))
    # float32, the same products summed in another order through two tiny layers: a few ulps of ~3
    assert abs(scaled - reference) < 1e-5 * max(1.0, abs(reference)), (scaled, reference)


@pytest.fixture(scope="module")
def gentle(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny chat model with three small-delta adapters (b_scale 1): a smooth loss (the planted
    fixture's peaked model curves so fast that difference quotients say nothing at any usable h)."""
    root = tmp_path_factory.mktemp("gentle")
    adapters = [load_adapter(write_peft_adapter(tiny_chat_base, root / f"g{i}", seed=i, b_scale=1.0)) for i in range(3)]
    examples = [("stone cloud river", "RIVER"), ("paper light", "light paper"), ("one two three", "3")]
    return Runtime(tiny_chat_base), adapters, examples


def test_gradient_is_the_loss_slope(gentle) -> None:
    """Autograd's d loss / d c against central differences at h = 1e-2: the float32 loss (relative
    precision ~1e-6 after two layers) makes the quotient good to ~1e-6·|loss|/h; the curvature over
    h adds h²·|third derivative|/6 (~1e-5 here). Bound: 1e-3·max(1, loss)."""
    runtime, adapters, examples = gentle
    runtime.set_slots([adapters])
    paths = list(adapters[0].modules)
    c = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    widths = torch.tensor(runtime.slots.placements[1].widths)

    def loss(coefficients: torch.Tensor, differentiable: bool) -> torch.Tensor:
        return nll_of(runtime, examples, {p: coefficients.repeat_interleave(widths) for p in paths}, differentiable)

    value = loss(c, True)
    value.backward()
    assert float(c.grad.abs().max()) > 1e-2  # a slope worth checking
    h = 1e-2
    for i in range(3):
        step = torch.zeros(3)
        step[i] = h
        slope = (float(loss(c.detach() + step, False)) - float(loss(c.detach() - step, False))) / (2 * h)
        assert abs(float(c.grad[i]) - slope) < 1e-3 * max(1.0, float(value.detach())), (i, float(c.grad[i]), slope)


def test_fit_recovers_planted_coefficients(planted) -> None:
    """The planted model is peaked and its loss far from convex: at lr 0.2 Adam crosses from 0 into
    the planted basin (at 0.05 it stops in a local minimum: the next test)."""
    runtime, adapters, examples = planted
    steps = []
    fit = fit_coefficients(runtime, adapters, examples, {"steps": 80, "lr": 0.2, "l1": 0.0}, init=[0.0, 0.0, 0.0], chat=False, on_step=lambda *a: steps.append(a))
    got = next(iter(fit.coefficients.values()))
    assert all(c == got for c in fit.coefficients.values())  # per source: one vector for every module
    assert np.abs(np.array(got) - PLANTED).max() < 0.1, got
    assert len(fit.losses) == 80 and fit.best_loss == min(fit.losses) and fit.losses[-1] < fit.losses[0]
    assert [s[:2] for s in steps] == [(i, 80) for i in range(1, 81)] and steps[-1][2] == fit.losses[-1]


def test_gradient_descent_can_stop_in_a_local_minimum_lorahub_avoids(planted) -> None:
    """What the README says of `learned` against LoraHub: from 0, Adam at lr 0.05 settles near
    (0.24, -0.11, 0.28), a local minimum (every neighbour 0.05 away is higher) whose loss (~12.45)
    is far above the planted weights' (~7.2); LoraHub's search from the same 0 (budget 20) ends in
    the planted basin. (Measured: 25 steps reach 12.47, 80 steps 12.446 at the same point.)"""
    runtime, adapters, examples = planted
    fit = fit_coefficients(runtime, adapters, examples, {"steps": 25, "lr": 0.05, "l1": 0.0}, init=[0.0, 0.0, 0.0], chat=False)
    stuck = np.array(next(iter(fit.coefficients.values())))
    assert np.abs(stuck - [0.24, -0.11, 0.28]).max() < 0.05 and np.abs(stuck - PLANTED).max() > 0.4, stuck
    objective = runtime_objective(runtime, adapters, examples, chat=False)
    neighbours = [stuck + step for i in range(3) for step in (0.05 * np.eye(3)[i], -0.05 * np.eye(3)[i])]
    at_stuck, at_planted, *around = objective(np.stack([stuck, np.array(PLANTED), *neighbours]))
    assert min(around) > at_stuck, (at_stuck, around)  # a minimum, if only a local one
    assert at_stuck > at_planted + 1.0, (at_stuck, at_planted)
    search = lorahub_search(runtime, adapters, examples, budget=20, seed=0, l1=0.0, chat=False)
    assert np.abs(np.array(search.weights) - PLANTED).max() < 0.1 and search.best_loss < at_stuck - 1.0, (search.weights, search.best_loss)


def test_per_module_and_per_layer_coefficients(planted) -> None:
    runtime, adapters, examples = planted
    paths = sorted(adapters[0].modules)
    assert len(set(coefficient_groups(paths, "module").values())) == len(paths)
    layers = coefficient_groups(paths, "layer")
    assert len(set(layers.values())) == len({p.split(".layers.")[1].split(".")[0] for p in paths}) > 1
    assert coefficient_groups(["lm.proj", "model.layers.0.q", "model.layers.0.v"], "layer") == {"lm.proj": 0, "model.layers.0.q": 1, "model.layers.0.v": 1}
    for per in ("module", "layer"):
        result = merge_learned(adapters, examples, runtime, [0.5, 0.5, 0.5], {"per": per, "steps": 6, "lr": 0.05}, chat=False)
        fitted = result.adapter.extra["learned"]
        assert fitted["per"] == per and len(fitted["losses"]) == 6
        coefficients = {p: result.adapter.extra["learned"]["coefficients"][p] for p in paths}
        assert len({tuple(c) for c in coefficients.values()}) > 1  # modules got their own
        reference = per_module_reference(adapters, coefficients)
        for path, delta in result.adapter.modules.items():
            torch.testing.assert_close(delta.dense(), reference.modules[path].dense(), rtol=1e-5, atol=1e-6)


def test_seeded_minibatches_and_cancellation(planted) -> None:
    runtime, adapters, examples = planted
    first = fit_coefficients(runtime, adapters, examples, {"steps": 3, "batch_size": 4}, seed=7, chat=False)
    again = fit_coefficients(runtime, adapters, examples, {"steps": 3, "batch_size": 4}, seed=7, chat=False)
    other = fit_coefficients(runtime, adapters, examples, {"steps": 3, "batch_size": 4}, seed=8, chat=False)
    assert first.losses == again.losses and first.coefficients == again.coefficients
    assert other.losses != first.losses
    seen = []
    with pytest.raises(SearchCancelled, match="fitting the coefficients was cancelled"):
        fit_coefficients(runtime, adapters, examples, {"steps": 10}, chat=False, on_step=lambda *a: seen.append(a), should_stop=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_chunked_pieces_are_the_same_step(gentle) -> None:
    """A step cut into chunks of examples (the server's engine jobs) sums the same gradient: only
    float32 rounding differs (other padded widths, another summation order), a few ulps of a
    loss ~3 through two tiny layers; Adam's 3 steps of lr 0.1 carry that into the coefficients
    far under 1e-5."""
    runtime, adapters, examples = gentle
    prompts, targets = tokenize_examples(runtime, examples, chat=True)
    runtime.set_slots([adapters])

    def fit(rows: int) -> CoefficientFit:
        return CoefficientFit(runtime, adapters, prompts, targets, {"per": "module", "batch_size": 2}, seed=3, chunk_rows=rows)

    assert len(list(fit(1).pieces())) == 2 + 1 + 1  # minibatches of 2 and 1 in chunks of 1, then the record
    whole, chunked = fit(32), fit(1)
    for _ in range(3):
        a, b = whole.step(1), chunked.step(1)
        assert abs(a - b) < 1e-5 * max(1.0, abs(a)), (a, b)
    for path, coefficients in whole.finish().coefficients.items():
        np.testing.assert_allclose(chunked.result.coefficients[path], coefficients, atol=1e-5)


def test_token_bounded_micro_batches_are_the_full_batch_step(gentle) -> None:
    """A full-batch step cut into micro-batches of at most `chunk_tokens` padded tokens (one row
    each here: every example is longer than the bound) accumulates the same gradient: the same
    float32 argument as above, so the same 1e-5."""
    runtime, adapters, examples = gentle
    prompts, targets = tokenize_examples(runtime, examples, chat=True)
    runtime.set_slots([adapters])
    shortest = min(len(p) + len(t) for p, t in zip(prompts, targets))

    def fit(tokens: int | None) -> CoefficientFit:
        return CoefficientFit(runtime, adapters, prompts, targets, {"per": "module"}, seed=3, chunk_tokens=tokens)

    assert len(list(fit(shortest).pieces())) == len(examples) + 1  # one example per micro-batch, then the record
    whole, micro = fit(None), fit(shortest)
    for _ in range(3):
        a, b = whole.step(1), micro.step(1)
        assert abs(a - b) < 1e-5 * max(1.0, abs(a)), (a, b)
    for path, coefficients in whole.finish().coefficients.items():
        np.testing.assert_allclose(micro.result.coefficients[path], coefficients, atol=1e-5)


def test_seq2seq_coefficients_are_fitted_too(smollm2: Path, tmp_path: Path) -> None:
    base = tiny_t5(tmp_path / "t5", tokenizer_from=smollm2)
    adapters = [load_adapter(write_peft_adapter(base, tmp_path / f"t{i}", seed=i, targets=["q", "v"], task_type="SEQ_2_SEQ_LM")) for i in range(2)]
    runtime = Runtime(base, targets=["q", "v"])
    fit = fit_coefficients(runtime, adapters, [("stone cloud", "paper"), ("river light", "table")], {"steps": 4})
    assert len(fit.losses) == 4 and np.isfinite(fit.best_loss) and fit.losses[-1] < fit.losses[0]


def test_recipe_and_cli(planted, tmp_path: Path) -> None:
    runtime, adapters, examples = planted
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps({"input": x, "target": y}) + "\n" for x, y in examples))
    recipe = {
        "method": "learned",
        "sources": [{"adapter": a.source, "weight": 0.5} for a in adapters],
        "examples": "examples.jsonl",
        "base": str(runtime.base_dir),
        "chat": False,
        "parameters": {"steps": 5, "lr": 0.05},
        "output": "out",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["merge", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    saved = load_adapter(tmp_path / "out")
    expected = merge_learned(adapters, examples, runtime, [0.5] * 3, {"steps": 5, "lr": 0.05}, chat=False)
    for path, delta in expected.adapter.modules.items():
        torch.testing.assert_close(saved.modules[path].dense(), delta.dense(), rtol=1e-5, atol=1e-7)  # the same fit, twice
    assert json.loads((tmp_path / "out" / "adapter_fusion.json").read_text())["learned"]["losses"]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"method": "learned", "sources": [{"adapter": "a"}]}, "examples: method 'learned' fits its coefficients on examples"),
        ({"method": "learned", "sources": [{"adapter": "a", "examples": "e"}], "examples": "e"}, "sources.0.examples: method 'learned' takes one shared top-level"),
        ({"method": "ties", "sources": [{"adapter": "a"}], "examples": "e"}, "examples: method 'ties' takes no shared examples (only learned does)"),
        ({"method": "learned", "sources": [{"adapter": "a"}], "examples": "e", "parameters": {"per": "row"}}, "per: Input should be 'source', 'layer' or 'module'"),
        ({"method": "learned", "sources": [{"adapter": "a"}], "examples": "e", "parameters": {"steps": 0}}, "steps: Input should be greater than or equal to 1"),
    ],
)
def test_bad_recipes(recipe, message) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", "\\(").replace(")", "\\)")):
        parse_recipe(recipe)


def test_refusals(planted) -> None:
    runtime, adapters, examples = planted
    with pytest.raises(RecipeError, match="method 'learned' learns from data: give it examples"):
        merge(adapters, "learned")
    with pytest.raises(RecipeError, match="at least one example"):
        fit_coefficients(runtime, adapters, [])
    with pytest.raises(RecipeError, match="got 2 initial coefficients for 3 adapters"):
        fit_coefficients(runtime, adapters, examples, init=[1.0, 1.0])
    with pytest.raises(RecipeError, match="bad parameters for method 'learned': lr: Input should be greater than 0"):
        fit_coefficients(runtime, adapters, examples, {"lr": 0})


def test_fit_targets_end_where_the_answer_ends(gentle) -> None:
    """In a chat, a fit learns the answer and the end of the assistant's turn (without it, per-module
    fits learned the right first digits and then did not stop); raw text is learned as given; a
    template with no turn end, or one that refuses the probe, leaves answers alone."""
    runtime = gentle[0]
    end = runtime.tokenizer.convert_tokens_to_ids("<|im_end|>")  # SmolLM2's chat template closes each message with it
    assert runtime.end_of_turn == end
    _, targets = tokenize_examples(runtime, [("say yes", "yes")], chat=True)
    assert targets == [runtime.text_ids("yes") + [end]]
    _, raw = tokenize_examples(runtime, [("say yes", "yes")], chat=False)
    assert raw == [runtime.text_ids("yes")]
    template = runtime.tokenizer.chat_template
    try:
        runtime.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        assert runtime.encoder._end_of_turn() is None
        runtime.tokenizer.chat_template = "{{ raise_exception('this template takes no assistant turn') }}"
        assert runtime.encoder._end_of_turn() is None
    finally:
        runtime.tokenizer.chat_template = template
