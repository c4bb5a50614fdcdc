"""mergekit parity. First our methods' mergekit options (sign_from, divide_by, zero_divisor, lambda,
rescale_norm, on_empty, SLERP's threshold), then mergekit configs read as our recipes: each, run on
real peft adapters, equals mergekit's rule written out from its source (tests/mergekit_formulas.py)
on the same dense deltas; every refusal names the key; the CLI reads the format."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from adapter_fusion import load_adapter, merge
from adapter_fusion.cli import app
from adapter_fusion.errors import RecipeError
from adapter_fusion.mergekit import to_recipe
from adapter_fusion.recipe_run import run_recipe
from tests.mergekit_formulas import mergekit_gta, mergekit_l1_drop, mergekit_magnitude, mergekit_outliers, stock_reference
from tests.test_merge_methods import EPS32, FULL, check_against, gen, raw_deltas, relative_difference, weighted
from tests.test_merge_methods import tall_adapters, tall_raw, tall_sources  # noqa: F401 (fixtures)

WEIGHTS = [0.6, -0.4, 0.8, 0.5]
runner = CliRunner()


@pytest.fixture(scope="module")
def raw(tiny_adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [raw_deltas(p) for p in tiny_adapters]


@pytest.fixture(scope="module")
def sources(tiny_adapters: list[Path]):
    return [load_adapter(p) for p in tiny_adapters]


# ---- our methods' mergekit options ---------------------------------------------------------------


MERGEKIT_OPTIONS = {"sign_from": "weighted", "zero_divisor": "one", "majority_sign": "total"}


def test_ties_with_mergekit_options_is_mergekits_ties(sources, raw) -> None:
    params = {"density": 0.4, "divide_by": "weights", "lambda": 1.5, **MERGEKIT_OPTIONS}
    result = merge(sources, "ties", WEIGHTS, params, rank=FULL)
    check_against(result, raw, lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_magnitude(t, 0.4), True, True, 1.5))


def test_sign_is_elected_on_weighted_deltas(sources, raw) -> None:
    """With a negative weight, voting on w·δ and on δ differ; mergekit votes on w·δ."""
    params = {"density": 0.4, "divide_by": "weights", "sign_from": "weighted"}
    weighted = merge(sources, "ties", WEIGHTS, params, rank=FULL).adapter.modules
    unweighted = merge(sources, "ties", WEIGHTS, {**params, "sign_from": "deltas"}, rank=FULL).adapter.modules
    path = "model.layers.0.self_attn.q_proj"
    assert relative_difference(weighted[path].dense(), unweighted[path].dense()) > 0.1


def test_zero_agreeing_weight_sum_divides_by_one_as_mergekit(sources, raw) -> None:
    """Weights (1, −1): wherever both weighted deltas agree, the agreeing weights sum to 0. mergekit
    divides by 1 there (keeping the agreeing sum); our documented default gives 0."""
    weights = [1.0, -1.0]
    params = {"density": 1.0, "divide_by": "weights", **MERGEKIT_OPTIONS}
    one = merge(sources[:2], "ties", weights, params, rank=FULL)
    check_against(one, raw[:2], lambda ts, _: mergekit_gta(ts, weights, lambda t, i: t, True, True))
    path = "model.layers.0.mlp.up_proj"
    x, y = raw[0][path], raw[1][path]
    both = (x * -y > 0)  # w·δ agree: δ_x and −δ_y share a sign
    assert both.float().mean() > 0.2  # the case is exercised
    zero = merge(sources[:2], "ties", weights, {**params, "zero_divisor": "zero"}, rank=FULL).adapter.modules[path].dense()
    assert zero[both].abs().max() < max(x.shape) * EPS32 * float(torch.linalg.norm(x - y))
    kept = one.adapter.modules[path].dense()[both]
    assert relative_difference(kept, (x - y)[both]) < max(x.shape) * EPS32 * 4


def test_dare_with_l1_rescale_is_mergekits_dare(sources, raw) -> None:
    ties = {"density": 0.5, "rescale_norm": "l1", "divide_by": "none", "lambda": 0.7, **MERGEKIT_OPTIONS}
    result = merge(sources, "dare_ties", WEIGHTS, ties, rank=FULL, seed=3)
    check_against(
        result, raw, lambda ts, path: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_l1_drop(t, 0.5, gen(3, path, i)), True, False, 0.7)
    )
    linear = merge(sources, "dare_linear", WEIGHTS, {"density": 0.6, "rescale_norm": "l1"}, rank=FULL, seed=4)
    check_against(linear, raw, lambda ts, path: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_l1_drop(t, 0.6, gen(4, path, i)), False, False))


def test_dare_l1_rescale_across_row_blocks(tall_sources, tall_raw) -> None:
    """The L1 factor needs the whole tensor's mask: a first pass must draw exactly the masks the
    merge pass draws, block by block."""
    result = merge(tall_sources, "dare_linear", WEIGHTS, {"density": 0.3, "rescale_norm": "l1"}, rank=FULL, seed=9)
    check_against(result, tall_raw, lambda ts, path: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_l1_drop(t, 0.3, gen(9, path, i)), False, False))


def test_a_density_that_keeps_nothing(sources, raw) -> None:
    """int(density·n) = 0: zero (default), keep each source's largest entry, or a clear error
    (mergekit asserts: 'not gonna zero out the whole tensor buddy')."""
    tiny = 1e-5  # < 1/(64·64), the smallest module's entry count
    zero = merge(sources, "magnitude_prune", WEIGHTS, {"density": tiny}, rank=FULL)
    assert all(m.rank == 0 for m in zero.report)
    one = merge(sources, "magnitude_prune", WEIGHTS, {"density": tiny, "on_empty": "keep_one"}, rank=FULL)
    check_against(one, raw, lambda ts, _: weighted([t * (t.abs() == t.abs().max()) for t in ts]))
    with pytest.raises(RecipeError, match=r"density 1e-05 keeps no entry of module 'model.layers.0.mlp.down_proj' \(8192 entries.*on_empty: keep_one"):
        merge(sources, "ties", WEIGHTS, {"density": tiny, "on_empty": "error"}, rank=FULL)


def test_slerp_parallel_threshold_5e4_is_mergekits_dot_threshold() -> None:
    """mergekit lerps when |cos θ| > 0.9995. Between 1 − 5e-4 and 1 − 1e-6 our default slerps and
    `parallel_threshold: 5e-4` lerps, as mergekit does."""
    from adapter_fusion import Adapter
    from adapter_fusion.delta import LowRankDelta

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(32, 2, generator=g), torch.randn(2, 24, generator=g)
    noise = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(1, 24, generator=g))
    x = LowRankDelta(B, A)
    y = LowRankDelta.concat([x, noise.scaled(0.02 * x.frobenius_norm() / noise.frobenius_norm())])
    dx, dy = x.dense().double().flatten(), y.dense().double().flatten()
    cos = float(dx @ dy / (dx.norm() * dy.norm()))
    assert 1 - 5e-4 < cos < 1 - 1e-6  # between the two thresholds
    pair = [Adapter("x", {"m": x}), Adapter("y", {"m": y})]
    t = 0.3
    lerp = (1 - t) * x.dense() + t * y.dense()
    theta = math.acos(cos)
    slerp = ((math.sin((1 - t) * theta) * dx + math.sin(t * theta) * dy) / math.sin(theta)).view(32, 24).float()
    ours = merge(pair, "slerp", parameters={"t": t}).adapter.modules["m"].dense()
    like_mergekit = merge(pair, "slerp", parameters={"t": t, "parallel_threshold": 5e-4}).adapter.modules["m"].dense()
    assert relative_difference(like_mergekit, lerp) < 32 * EPS32
    assert relative_difference(ours, slerp) < 32 * EPS32
    assert relative_difference(ours, lerp) > 1e-6  # the two rules differ measurably here


# ---- mergekit configs ---------------------------------------------------------------------------


def config(adapters: list[Path], method: str, per_model: list[dict] | None = None, **top) -> dict:
    """A mergekit config over `adapters`, with the base listed first (as mergekit's examples do)."""
    per_model = per_model or [{"weight": w} for w in WEIGHTS[: len(adapters)]]
    models = [{"model": "tiny-base"}] + [{"model": str(p), "parameters": params} for p, params in zip(adapters, per_model)]
    return {"merge_method": method, "base_model": "tiny-base", "models": models, **top}


def test_ties(tiny_adapters, raw) -> None:
    """normalize (default true), lambda, int8_mask (no effect), a shared density from the top level."""
    data = config(tiny_adapters, "ties", parameters={"density": 0.4, "lambda": 1.5, "int8_mask": True}, rank=FULL)
    rule = lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_magnitude(t, 0.4), True, True, 1.5)  # noqa: E731
    check_against(run_recipe(to_recipe(data)), raw, rule)
    plain = config(tiny_adapters, "ties", parameters={"density": 0.4, "normalize": False}, rank=FULL)
    check_against(run_recipe(to_recipe(plain)), raw, lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_magnitude(t, 0.4), True, False))


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_and_dare_linear(normalize, tiny_adapters, raw) -> None:
    """rescale (default true) is mergekit's L1 norm matching; normalize defaults to false."""
    per_model = [{"weight": w, "density": 0.5} for w in WEIGHTS]
    for method, consensus in (("dare_ties", True), ("dare_linear", False)):
        data = config(tiny_adapters, method, per_model, parameters={"normalize": normalize, "lambda": 0.8}, rank=FULL, seed=5)
        check_against(
            run_recipe(to_recipe(data)),
            raw,
            lambda ts, path: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_l1_drop(t, 0.5, gen(5, path, i)), consensus, normalize, 0.8),
        )


def test_task_arithmetic_and_breadcrumbs(tiny_adapters, raw) -> None:
    data = config(tiny_adapters, "task_arithmetic", parameters={"normalize": True, "lambda": 2.0})
    check_against(run_recipe(to_recipe(data)), raw, lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: t, False, True, 2.0))
    crumbs = config(tiny_adapters, "breadcrumbs", parameters={"density": 0.5, "gamma": 0.1}, rank=FULL)
    check_against(run_recipe(to_recipe(crumbs)), raw, lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_outliers(t, 0.5, 0.1), False, False))


def test_linear_counts_the_base_weight(tiny_adapters, raw) -> None:
    """mergekit's linear is Σ w·W / Σ w over every listed model, the base included: W0 + Σ (w/Σw)·ΔW."""
    data = config(tiny_adapters[:2], "linear", [{"weight": 0.6}, {"weight": 0.4}])
    data["models"][0]["parameters"] = {"weight": 1.0}  # the base, a zero delta that still normalises
    check_against(run_recipe(to_recipe(data)), raw[:2], lambda ts, _: (0.6 * ts[0] + 0.4 * ts[1]) / 2.0)


def test_model_stock(tiny_adapters, raw) -> None:
    data = config(tiny_adapters, "model_stock", [{}] * 4, parameters={"filter_wise": True})
    check_against(run_recipe(to_recipe(data)), raw, lambda ts, _: stock_reference(ts, "cosine", True))


def test_base_plus_adapter_syntax_and_our_keys(tiny_adapters) -> None:
    data = config(tiny_adapters[:1], "task_arithmetic", [{"weight": 0.5}], out_dtype="bfloat16", name="x", seed=3)
    data["models"][1]["model"] = f"some/base+{tiny_adapters[0]}"
    recipe = to_recipe(data)
    assert recipe.sources[0].adapter == str(tiny_adapters[0])
    assert (recipe.dtype, recipe.name, recipe.seed, recipe.sources[0].weight) == ("bfloat16", "x", 3, 0.5)


BAD = [
    ({"slices": []}, "slices: not supported \\(layer slicing"),
    ({"tokenizer_source": "base"}, "tokenizer_source: not supported \\(an adapter has no tokenizer"),
    ({"rnak": 4}, "rnak: unknown mergekit key \\(supported: merge_method, models"),
    ({"merge_method": "slerp"}, "merge_method slerp: not translated: mergekit interpolates whole weights"),
    ({"merge_method": "della"}, "merge_method della: not translated: mergekit ranks magnitudes per row"),
    ({"merge_method": "karcher"}, "merge_method 'karcher': not supported; supported: linear, task_arithmetic, ties"),
    ({"parameters": {"densty": 0.5}}, "parameters.densty: not a parameter of mergekit's ties \\(known: normalize"),
    ({"parameters": {"density": [0.1, 0.5]}}, "parameters.density: per-layer values \\(lists, filters\\) are not supported"),
    ({"parameters": {"rescale": True}}, "parameters.rescale: mergekit's L1 rescale after ties's magnitude pruning is not supported"),
    ({"models": []}, "models: a mergekit config lists the adapters"),
    ({"models": [{"model": "tiny-base"}]}, "models: only the base model is listed"),
    ({"models": [{"model": {"path": "x"}, "parameters": {"weight": 1}}]}, "models.0.model: give the adapter directory as a string"),
    ({"models": [{"model": "x", "parameters": {"weight": 1}, "lora": "y"}]}, "models.0.lora: not supported"),
    ({"models": [{"model": "x", "parameters": {"density": 0.5}}]}, "models.0.parameters.weight: required by mergekit's ties"),
    ({"models": [{"model": "x", "parameters": {"weight": 1, "t": 0.5}}]}, "models.0.parameters.t: not a per-model parameter of mergekit's ties"),
    ({"models": [{"model": "x", "parameters": {"weight": "heavy"}}]}, "models.0.parameters.weight: expected a finite number, got 'heavy'"),
    (
        {"models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}, {"model": "y", "parameters": {"weight": 1, "density": 0.3}}]},
        "models.\\*.parameters.density: must be equal across models here \\(got \\[0.3, 0.5\\]\\)",
    ),
    ({"merge_method": "linear", "parameters": {"normalize": False}}, "linear with normalize: false scales the base model by Σ weight = 1.5"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters": {"weight": -1}}]}, "linear: the weights sum to 0"),
    ({"out_dtype": "int8"}, "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
def test_refusals_name_the_key(changes, message) -> None:
    data = {"merge_method": "ties", "base_model": "tiny-base", "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.5}}]}
    data.update(changes)
    with pytest.raises(RecipeError, match=message):
        to_recipe(data)


def test_cli_reads_a_mergekit_config(tiny_adapters, raw, tmp_path: Path) -> None:
    data = config(tiny_adapters, "ties", parameters={"density": 0.4}, rank=FULL)
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["merge", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "ties of 4 adapters" in result.output
    saved = load_adapter(tmp_path / "out")
    rule = lambda ts, _: mergekit_gta(ts, WEIGHTS, lambda t, i: mergekit_magnitude(t, 0.4), True, True)  # noqa: E731
    check_against(type("Result", (), {"adapter": saved})(), raw, rule)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slices": []}, "mergekit.yaml: slices: not supported"),
        ({"parameters": {"density": 1e-5}}, "density 1e-05 keeps no entry of module 'model.layers.0.mlp.down_proj'"),  # mergekit asserts here
    ],
)
def test_cli_errors_users_see(changes, message, tiny_adapters, tmp_path: Path) -> None:
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump({**config(tiny_adapters, "ties"), **changes}))
    result = runner.invoke(app, ["merge", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "error:" in result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()
