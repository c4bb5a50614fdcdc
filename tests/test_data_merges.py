"""regmean and fisher: the rules against dense formulas written here, the statistics against a
plain float64 peft reference (adapter merged into the weights, inputs and gradients read off the
merged Linear layers), identities, recipes and the CLI (over gRPC: tests/test_compose_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from adapter_fusion import load_adapter, merge
from adapter_fusion.cli import app
from adapter_fusion.base_model import load_base
from adapter_fusion.data_merge import collect_statistics, encode, load_examples, merge_with_data
from adapter_fusion.errors import RecipeError
from adapter_fusion.lorahub import tokenize_examples
from adapter_fusion.recipe import parse_recipe
from adapter_fusion.recipe_run import load_recipe, run_recipe
from adapter_fusion.runtime import Runtime
from tests.conftest import write_peft_adapter
from tests.numerics import EPS32, logits_bound
from tests.test_merge_methods import FULL, check_against, raw_deltas, relative_difference

runner = CliRunner()
EXAMPLES = [
    [("alpha beta gamma", "ALPHA BETA GAMMA"), ("one two", "ONE TWO"), ("red green blue", "RED GREEN BLUE")],
    [("cat dog", "dog cat"), ("sun moon star", "star moon sun")],
    [("seven", "7"), ("twelve", "12"), ("three", "3"), ("forty", "40")],
]


@pytest.fixture(scope="module")
def chat_adapters(tiny_chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three peft adapters on the tiny chat model (ranks 4, 8 rsLoRA, 4 on q/v only). b_scale=1:
    with larger deltas the random model's logits saturate and its gradients become so ill-conditioned
    that float64 runs of the same maths differ by 1e-7 (measured), beyond any float32 bound."""
    root = tmp_path_factory.mktemp("chat-adapters")
    return [
        write_peft_adapter(tiny_chat_base, root / "a", seed=1, b_scale=1.0),
        write_peft_adapter(tiny_chat_base, root / "b", seed=2, r=8, alpha=8, use_rslora=True, b_scale=1.0),
        write_peft_adapter(tiny_chat_base, root / "c", seed=3, targets=["q_proj", "v_proj"], b_scale=1.0),
    ]


@pytest.fixture(scope="module")
def sources(chat_adapters):
    return [load_adapter(p) for p in chat_adapters]


@pytest.fixture(scope="module")
def raw(chat_adapters):
    return [raw_deltas(p) for p in chat_adapters]


@pytest.fixture(scope="module")
def base(tiny_chat_base: Path):
    """(model, encoder) as regmean and fisher load them: float32, frozen."""
    loaded = load_base(tiny_chat_base, dtype="float32")
    return loaded.model, loaded.encoder


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G̃: off-diagonal entries times alpha."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def chat_ids(tokenizer, example, end_of_turn: bool = True) -> tuple[list[int], list[int]]:
    """An example tokenized here by hand as learned and LoraHub fit it: the chat template's user
    turn, then the target and (unless `end_of_turn` is off) SmolLM2's end of the assistant's turn."""
    x, y = example
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False)
    target = tokenizer(y, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], target + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if end_of_turn else [])


def reference_statistics(kind: str, base_dir: Path, adapter_dir: Path, examples, tokenizer, end_of_turn: bool = True) -> dict[str, torch.Tensor]:
    """peft merges the adapter into float64 weights; Gram = mean x xᵀ of each Linear's inputs,
    Fisher = mean over examples of (∂ loss / ∂W)², read from the merged weights' gradients; the
    examples tokenized by `chat_ids` and the loss written out here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64), adapter_dir).merge_and_unload()
    merged.eval().requires_grad_(True)
    paths = list(load_adapter(adapter_dir).modules) if kind == "fisher" else None
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def record(path):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[path] = sums.get(path, 0) + x.T @ x
            tokens[path] = tokens.get(path, 0) + x.shape[0]

        return hook

    targets = [n for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    hooks = [merged.get_submodule(n).register_forward_pre_hook(record(n)) for n in targets] if kind == "gram" else []
    for example in examples:
        prompt, target = chat_ids(tokenizer, example, end_of_turn)
        ids = torch.tensor([prompt + target])
        if kind == "gram":
            with torch.no_grad():
                merged(input_ids=ids)
        else:
            merged.zero_grad()
            logits = merged(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (target tokens, vocab): the positions predicting them
            torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").backward()
            for path in paths:
                sums[path] = sums.get(path, 0) + merged.get_submodule(path).weight.grad.square()
    for h in hooks:
        h.remove()
    return {p: s / (tokens[p] if kind == "gram" else len(examples)) for p, s in sums.items()}


def test_examples_are_the_tokens_learned_and_lorahub_fit(base, tiny_chat_base) -> None:
    """regmean and fisher see an example as learned and LoraHub do (`tokenize_examples` on the
    serving runtime): the chat user turn, then the target and the token ending the assistant's
    turn, which the labels score too; raw text without it."""
    model, encoder = base
    runtime = Runtime(tiny_chat_base)
    for chat in (True, False):
        (prompt,), (target,) = tokenize_examples(runtime, [("hi there", "HI THERE")], chat=chat)
        assert (prompt, target) == (chat_ids(encoder.tokenizer, ("hi there", "HI THERE")) if chat else (encoder.text_ids("hi there"), encoder.text_ids("HI THERE")))
        batch = encode(model, encoder, ("hi there", "HI THERE"), chat=chat)
        assert batch["input_ids"][0].tolist() == prompt + target
        assert batch["labels"][0].tolist() == [-100] * len(prompt) + target
    assert encoder.tokenizer.decode(target) == "HI THERE"
    assert runtime.end_of_turn == encoder.end_of_turn == encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("kind", ["gram", "fisher"])
def test_statistics_follow_the_end_of_turn_target(kind, base, tiny_chat_base, chat_adapters, sources) -> None:
    """The token ending the turn is an input (regmean's Gram) and a scored target (fisher's
    gradient): statistics match the reference with it and are far from the reference without."""
    model, encoder = base
    ours = collect_statistics(kind, model, encoder, sources[:1], [EXAMPLES[0][:1]])
    rho = logits_bound(model.config, 0.0)
    bound = 2 * rho if kind == "gram" else 4 * rho
    reference = reference_statistics(kind, tiny_chat_base, chat_adapters[0], EXAMPLES[0][:1], encoder.tokenizer)
    without = reference_statistics(kind, tiny_chat_base, chat_adapters[0], EXAMPLES[0][:1], encoder.tokenizer, end_of_turn=False)
    for path, expected in reference.items():
        assert relative_difference(ours[path][0], expected) < bound, path
        assert relative_difference(ours[path][0], without[path]) > 100 * bound, path


@pytest.mark.parametrize("kind", ["gram", "fisher"])
def test_statistics_match_the_float64_reference(kind, base, tiny_chat_base, chat_adapters, sources) -> None:
    """Ours run in float32 with the adapter as a side path, the reference in float64 with it merged.
    Each layer's inputs then differ by ρ = L·√d·eps32 relative (numerics.logits_bound): a Gram
    matrix (x xᵀ) by 2ρ. A gradient g xᵀ adds the backward pass's own ρ; its square doubles the
    relative error again: 4ρ."""
    model, encoder = base
    ours = collect_statistics(kind, model, encoder, sources[:2], EXAMPLES[:2])
    rho = logits_bound(model.config, 0.0)
    bound = 2 * rho if kind == "gram" else 4 * rho
    for i in range(2):
        reference = reference_statistics(kind, tiny_chat_base, chat_adapters[i], EXAMPLES[i], encoder.tokenizer)
        assert set(reference) <= set(ours)
        for path, expected in reference.items():
            assert relative_difference(ours[path][i], expected) < bound, (path, i)


def test_regmean_rule_is_the_dense_closed_form(sources, raw) -> None:
    """(Σ w ΔW G̃)(Σ w G̃)⁻¹ in float64 from random Gram matrices (x xᵀ of random inputs, some
    singular before shrinkage). Ours solves in float64 and casts the factors once: max(out, in)·eps32."""
    g = torch.Generator().manual_seed(0)
    weights, alpha = [0.5, 1.0, 2.0], 0.7
    statistics = {}
    for path in set().union(*raw):
        n_in = next(r[path].shape[1] for r in raw if path in r)
        xs = [torch.randn(n_in // 2, n_in, generator=g, dtype=torch.float64) for _ in raw]  # rank in/2: singular
        statistics[path] = [x.T @ x / x.shape[0] for x in xs]
    result = merge(sources, "regmean", weights, {"alpha": alpha}, rank=FULL, statistics=statistics)

    def closed_form(ts, path):
        grams = [shrink(s, alpha) for s in statistics[path]]
        total = sum(w * s for w, s in zip(weights, grams))
        return (sum(w * t.double() @ s for w, t, s in zip(weights, ts, grams)) @ torch.linalg.inv(total)).float()

    check_against(result, raw, closed_form)


def test_fisher_rule_is_the_weighted_mean(sources, raw) -> None:
    g = torch.Generator().manual_seed(1)
    weights, floor = [0.5, 1.0, 2.0], 1e-3
    statistics = {}
    for path in set().union(*raw):
        shape = next(r[path].shape for r in raw if path in r)
        statistics[path] = [torch.rand(shape, generator=g) ** 4 for _ in raw]  # many entries below the floor
    result = merge(sources, "fisher", weights, {"fisher_floor": floor}, rank=FULL, statistics=statistics)

    def mean(ts, path):
        fs = [w * f.clamp(min=floor) for w, f in zip(weights, statistics[path])]
        return sum(f * t for f, t in zip(fs, ts)) / sum(fs)

    check_against(result, raw, mean)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_composing_an_adapter_with_itself_returns_it(method, tiny_chat_base, sources, raw) -> None:
    """ΔW G̃₁M⁻¹ + ΔW G̃₂M⁻¹ = ΔW and (F₁ΔW + 3F₂ΔW)/(F₁ + 3F₂) = ΔW, whatever the examples."""
    twice = merge_with_data([sources[1]] * 2, method, EXAMPLES[:2], tiny_chat_base, weights=[1.0, 3.0])
    check_against(twice, raw[1:2] * 2, lambda ts, _: ts[0])
    alone = merge_with_data(sources[1:2], method, EXAMPLES[2:], tiny_chat_base)
    check_against(alone, raw[1:2], lambda ts, _: ts[0])


def test_regmean_end_to_end_against_the_reference(base, tiny_chat_base, chat_adapters, sources, raw) -> None:
    """The whole pipeline against RegMean on full float64 weights: W* = (Σ W_s G̃_s)(Σ G̃_s)⁻¹, minus W0.
    Grams differ by 2ρ (above); the solve turns that into at most κ(M)·4ρ (perturbation of a linear
    system in both sides), plus the cast of the factors."""
    model, encoder = base
    result = merge_with_data(sources, "regmean", EXAMPLES, tiny_chat_base, rank=FULL)
    references = [reference_statistics("gram", tiny_chat_base, d, e, encoder.tokenizer) for d, e in zip(chat_adapters, EXAMPLES)]
    rho = logits_bound(model.config, 0.0)
    for path, delta in result.adapter.modules.items():
        grams = [shrink(r[path], 0.9) for r in references]
        W0 = model.get_submodule(path).weight.double()
        total = sum(grams)
        full = sum((W0 + r.get(path, torch.zeros_like(W0)).double()) @ s for r, s in zip(raw, grams)) @ torch.linalg.inv(total)
        expected = full - W0
        bound = float(torch.linalg.cond(total)) * 4 * rho + max(delta.shape) * EPS32
        assert relative_difference(delta.dense(), expected) < bound, path


def write_examples(folder: Path) -> list[Path]:
    paths = []
    for i, rows in enumerate(EXAMPLES):
        path = folder / f"examples{i}.jsonl"
        path.write_text("\n".join(json.dumps({"input": x, "target": y}) for x, y in rows) + "\n")
        paths.append(path)
    return paths


def test_recipe_and_cli(tiny_chat_base, chat_adapters, sources, tmp_path: Path) -> None:
    """Relative `examples` resolve against the recipe's folder; --base overrides the recipe's; the
    CLI's result is the Python API's."""
    write_examples(tmp_path)
    recipe = {
        "method": "fisher",
        "sources": [{"adapter": str(p), "examples": f"examples{i}.jsonl"} for i, p in enumerate(chat_adapters)],
        "base": "no-such-model",
        "rank": 6,
        "output": "out",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    bad = runner.invoke(app, ["merge", str(path)])
    assert bad.exit_code == 2 and "no-such-model: not a model directory (no config.json)" in " ".join(bad.output.split())
    good = runner.invoke(app, ["merge", str(path), "--base", str(tiny_chat_base)])
    assert good.exit_code == 0, good.output
    expected = merge_with_data(sources, "fisher", [load_examples(p) for p in sorted(tmp_path.glob("*.jsonl"))], tiny_chat_base, rank=6)
    saved = load_adapter(tmp_path / "out")
    for module, delta in expected.adapter.modules.items():
        assert torch.equal(saved.modules[module].dense(), delta.dense()), module
    parsed = load_recipe(path)
    assert parsed.sources[0].examples == str(tmp_path / "examples0.jsonl")
    assert run_recipe(parsed.model_copy(update={"base": str(tiny_chat_base), "method": "regmean", "rank": 6})).report


def test_inline_examples_in_a_recipe_are_the_files(tiny_chat_base, chat_adapters, tmp_path: Path) -> None:
    """The pairs written in the recipe (YAML, a dict, gRPC) give what the same pairs in files give."""
    write_examples(tmp_path)
    inline = [[{"input": i, "target": t} for i, t in rows] for rows in EXAMPLES]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "regmean", "sources": [{"adapter": str(p), "examples": rows} for p, rows in zip(chat_adapters, inline)], "base": str(tiny_chat_base)}))
    from_inline = run_recipe(load_recipe(path)).adapter
    files = {"method": "regmean", "sources": [{"adapter": str(p), "examples": str(tmp_path / f"examples{i}.jsonl")} for i, p in enumerate(chat_adapters)], "base": str(tiny_chat_base)}
    from_files = run_recipe(parse_recipe(files)).adapter
    for module, delta in from_files.modules.items():
        assert torch.equal(from_inline.modules[module].dense(), delta.dense()), module


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "examples file not found"),
        ("", "no examples; write one JSON object per line"),
        ('{"input": "a", "target": "b"}\n{oops', ":2: not valid JSON"),
        ('{"input": "a"}', ":1: every line needs string 'input' and 'target' (or 'output') keys"),
        ('{"input": "a", "target": 3}', ":1: every line needs string 'input' and 'target'"),
        ("[1, 2]", ":1: every line needs string 'input'"),
    ],
)
def test_bad_example_files(text, message, tmp_path: Path) -> None:
    path = tmp_path / "examples.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load_examples(path)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"method": "regmean", "sources": [{"adapter": "a", "examples": "e"}, {"adapter": "b"}]}, "sources.1.examples: method 'regmean' learns from each source's examples"),
        ({"method": "ties", "sources": [{"adapter": "a", "examples": "e"}]}, "sources.0.examples: method 'ties' uses no examples (only regmean, fisher, learned do)"),
        ({"method": "linear", "sources": [{"adapter": "a"}], "base": "m"}, "base: method 'linear' runs no model"),
        ({"method": "regmean", "sources": [{"adapter": "a", "examples": []}]}, "invalid recipe: sources.0.examples: List should have at least 1 item after validation, not 0"),
        ({"method": "regmean", "sources": [{"adapter": "a", "examples": [{"input": "x"}]}]}, "invalid recipe: sources.0.examples.0.target: required key missing"),
        ({"method": "learned", "sources": [{"adapter": "a"}], "examples": [{"input": "x", "target": "y", "weight": 1}]}, "examples.0.weight: unknown key (valid keys: input, target)"),
        ({"method": "learned", "sources": [{"adapter": "a"}], "examples": {"input": "x"}}, "invalid recipe: examples: Input should be a valid list"),
        ({"method": "fisher", "sources": [{"adapter": "a", "examples": "e"}], "parameters": {"fisher_floor": 0}}, "fisher_floor: Input should be greater than 0"),
        ({"method": "regmean", "sources": [{"adapter": "a", "examples": "e"}], "parameters": {"alpha": 1.5}}, "alpha: Input should be less than or equal to 1"),
    ],
)
def test_bad_recipes(recipe, message) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", "\\(").replace(")", "\\)")):
        parse_recipe(recipe)


def test_base_model_refusals(tiny_chat_base, tmp_path: Path) -> None:
    """The one loader (the serving runtime's and these merges') says what a directory lacks."""
    with pytest.raises(RecipeError, match="not a model directory \\(no config.json\\); give a transformers model directory"):
        load_base(tmp_path)
    (tmp_path / "config.json").write_text((tiny_chat_base / "config.json").read_text())
    with pytest.raises(RecipeError, match="no tokenizer; the examples are tokenized with the base model's tokenizer"):
        load_base(tmp_path)


def test_refusals_at_merge_time(tiny_chat_base, sources) -> None:
    with pytest.raises(RecipeError, match="method 'regmean' learns from data: give it examples"):
        merge(sources, "regmean")
    with pytest.raises(RecipeError, match="regmean weighs each source's examples: weights must be > 0, source 1 has -1.0"):
        merge_with_data(sources[:2], "regmean", EXAMPLES[:2], tiny_chat_base, weights=[1.0, -1.0])
    with pytest.raises(RecipeError, match="got examples for 1 sources, but 2 sources"):
        merge_with_data(sources[:2], "fisher", EXAMPLES[:1], tiny_chat_base)
    with pytest.raises(RecipeError, match="method 'ties' uses no examples"):
        merge_with_data(sources[:2], "ties", EXAMPLES[:2], tiny_chat_base)
    with pytest.raises(RecipeError, match="the input Gram matrices of module .* sum to a singular matrix"):
        merge_with_data(sources[:1], "regmean", [[("a", "b")]], tiny_chat_base, parameters={"alpha": 1.0})
