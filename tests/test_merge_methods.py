"""Every merge method against a plain dense reference written here, and against PEFT's
`add_weighted_adapter` wherever PEFT has the same method, on the same real adapters."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter_fusion import METHODS, load_adapter, merge
from adapter_fusion.errors import IncompatibleAdaptersError, RecipeError

WEIGHTS = [0.6, -0.4, 0.8, 0.5]
FULL = 64  # >= min(out, in) of every tiny module: re-factoring at this rank is exact


def raw_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """scale · B @ A per module, read plainly from the files (independent of our loader)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = A.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        out[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = scale * B @ A
    return out


@pytest.fixture(scope="module")
def sources(tiny_adapters: list[Path]):
    return [load_adapter(p) for p in tiny_adapters]


@pytest.fixture(scope="module")
def raw(tiny_adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [raw_deltas(p) for p in tiny_adapters]


def stacked(raw: list[dict[str, torch.Tensor]], path: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    return [r.get(path, torch.zeros(shape)) for r in raw]


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - y.double()) / max(torch.linalg.norm(y.double()), 1e-30))


def check_against(result, raw, rule, tol=1e-5) -> None:
    """Every output module equals rule(list of dense source deltas, path) to `tol` (Frobenius, relative)."""
    assert set(result.adapter.modules) == set().union(*raw)
    for path, delta in result.adapter.modules.items():
        shape = next(r[path].shape for r in raw if path in r)
        expected = rule(stacked(raw, path, shape), path)
        assert delta.shape == tuple(expected.shape)
        assert relative_difference(delta.dense(), expected) < tol, path


def keep_top(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, 0.0)


def ties_rule(ts: list[torch.Tensor], weights: list[float], divide_by: str = "count", rule: str = "total") -> torch.Tensor:
    out = torch.zeros_like(ts[0])
    for idx in range(ts[0].numel()):
        values = [t.flatten()[idx].item() for t in ts]
        mass = sum(values) if rule == "total" else sum(math.copysign(1, v) if v else 0 for v in values)
        sign = 1.0 if mass >= 0 else -1.0
        agree = [(v, w) for v, w in zip(values, weights) if v != 0 and math.copysign(1, v) == sign]
        norm = len(agree) if divide_by == "count" else sum(w for _, w in agree)
        out.view(-1)[idx] = sum(v * w for v, w in agree) / norm if agree and norm else 0.0
    return out


def gen(seed: int, path: str, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{path}/{i}".encode()))


# ---- exact (low-rank) methods ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "cat"])
def test_weighted_sum_methods_are_exact(method, sources, raw) -> None:
    result = merge(sources, method, WEIGHTS)
    check_against(result, raw, lambda ts, _: sum(w * t for w, t in zip(WEIGHTS, ts)))
    assert all(m.relative_error < 1e-6 for m in result.report)
    if method == "cat":
        assert result.adapter.modules["model.layers.0.self_attn.q_proj"].rank == 4 + 4 + 8 + 4


def test_svd_is_the_exact_best_rank_r(sources, raw) -> None:
    result = merge(sources, "svd", WEIGHTS, rank=6)

    def best_rank_6(ts, _):
        U, S, Vh = torch.linalg.svd(sum(w * t for w, t in zip(WEIGHTS, ts)).double())
        return ((U[:, :6] * S[:6]) @ Vh[:6]).float()

    check_against(result, raw, best_rank_6)
    assert all(m.rank == 6 for m in result.report)
    default = merge(sources, "svd", WEIGHTS)  # PEFT's default: the largest source rank
    assert {m.rank for m in default.report} == {8}


def test_slerp_matches_the_dense_formula(sources, raw) -> None:
    t = 0.3
    result = merge(sources[:2], "slerp", parameters={"t": t})

    def slerp(ts, _):
        x, y = ts[0].flatten().double(), ts[1].flatten().double()
        cos = float(x @ y / (x.norm() * y.norm()))
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
        return out.view_as(ts[0]).float()

    check_against(result, raw[:2], slerp)
    for t_end, which in ((0.0, 0), (1.0, 1)):
        end = merge(sources[:2], "slerp", parameters={"t": t_end})
        check_against(end, raw[:2], lambda ts, _: ts[which])


def test_factor_linear_is_lorahubs_rule(sources, tiny_adapters) -> None:
    result = merge([sources[0], sources[1]], "factor_linear", [0.7, 0.2])
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in tiny_adapters[:2]]
    tensors = [load_file(p / "adapter_model.safetensors") for p in tiny_adapters[:2]]
    for path, delta in result.adapter.modules.items():
        key = f"base_model.model.{path}"
        roots = [math.sqrt(c["lora_alpha"] / c["r"]) for c in configs]  # the scale, split over both factors
        B = sum(w * s * t[f"{key}.lora_B.weight"] for w, s, t in zip([0.7, 0.2], roots, tensors))
        A = sum(w * s * t[f"{key}.lora_A.weight"] for w, s, t in zip([0.7, 0.2], roots, tensors))
        torch.testing.assert_close(delta.dense(), B @ A, rtol=1e-5, atol=1e-6)


# ---- elementwise methods (dense per module) ---------------------------------------------------


def test_ties_matches_reference(sources, raw) -> None:
    params = {"density": 0.4, "majority_sign": "frequency", "divide_by": "weights"}
    result = merge(sources, "ties", WEIGHTS, params, rank=FULL)
    check_against(
        result, raw, lambda ts, _: ties_rule([keep_top(t, 0.4) for t in ts], WEIGHTS, "weights", "frequency")
    )


def test_magnitude_prune_matches_reference(sources, raw) -> None:
    result = merge(sources, "magnitude_prune", WEIGHTS, {"density": 0.3}, rank=FULL)
    check_against(result, raw, lambda ts, _: sum(w * keep_top(t, 0.3) for w, t in zip(WEIGHTS, ts)))


def test_dare_linear_matches_reference_and_is_seeded(sources, raw) -> None:
    result = merge(sources, "dare_linear", WEIGHTS, {"density": 0.6}, rank=FULL, seed=7)

    def dare(ts, path):
        return sum(w * t * (torch.rand(t.shape, generator=gen(7, path, i)) < 0.6) / 0.6 for i, (w, t) in enumerate(zip(WEIGHTS, ts)))

    check_against(result, raw, dare)
    again = merge(sources, "dare_linear", WEIGHTS, {"density": 0.6}, rank=FULL, seed=7)
    other = merge(sources, "dare_linear", WEIGHTS, {"density": 0.6}, rank=FULL, seed=8)
    path = "model.layers.1.mlp.up_proj"
    assert torch.equal(result.adapter.modules[path].dense(), again.adapter.modules[path].dense())
    assert not torch.allclose(result.adapter.modules[path].dense(), other.adapter.modules[path].dense())


def test_dare_ties_matches_reference(sources, raw) -> None:
    result = merge(sources, "dare_ties", WEIGHTS, {"density": 0.5}, rank=FULL, seed=3)

    def dare_ties(ts, path):
        dropped = [t * (torch.rand(t.shape, generator=gen(3, path, i)) < 0.5) / 0.5 for i, t in enumerate(ts)]
        return ties_rule(dropped, WEIGHTS)

    check_against(result, raw, dare_ties)


def test_breadcrumbs_matches_reference(sources, raw) -> None:
    result = merge(sources, "breadcrumbs", WEIGHTS, {"density": 0.5, "gamma": 0.1}, rank=FULL)

    def crumbs(t):
        order = t.abs().flatten().argsort(descending=True)
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[order[int(0.1 * t.numel()) : int(0.1 * t.numel()) + int(0.5 * t.numel())]] = True
        return t * keep.view_as(t)

    check_against(result, raw, lambda ts, _: sum(w * crumbs(t) for w, t in zip(WEIGHTS, ts)))


def test_della_matches_reference(sources, raw) -> None:
    params = {"density": 0.6, "epsilon": 0.2, "lambda": 1.5}
    result = merge(sources, "della", WEIGHTS, params, rank=FULL, seed=5)

    def della(ts, path):
        dropped = []
        for i, t in enumerate(ts):
            n = t.numel()
            rank_of = torch.empty(n)
            rank_of[t.abs().flatten().argsort()] = torch.arange(n, dtype=torch.float32)
            p = 0.6 - 0.1 + 0.2 * rank_of / (n - 1)  # smallest kept with 0.5, largest with 0.7
            keep = torch.rand(n, generator=gen(5, path, i)) < p
            dropped.append((t.flatten() * keep / p).view_as(t))
        return 1.5 * ties_rule(dropped, WEIGHTS)

    check_against(result, raw, della)


def test_refactoring_error_is_near_the_optimum(sources, raw) -> None:
    result = merge(sources, "ties", WEIGHTS, {"density": 0.5}, rank=8)
    for module in result.report:
        ts = stacked(raw, module.path, result.adapter.modules[module.path].shape)
        S = torch.linalg.svdvals(ties_rule([keep_top(t, 0.5) for t in ts], WEIGHTS).double())
        optimum = float(S[8:].square().sum().sqrt() / S.square().sum().sqrt())
        assert module.relative_error <= optimum * 1.01 + 1e-6


# ---- identities and refusals ------------------------------------------------------------------


# slerp takes two sources; della drops entries at every density below 1 by design.
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("slerp", "della")])
def test_one_source_with_weight_one_reproduces_it(method, sources, raw) -> None:
    params = {"density": 1.0} if "density" in METHODS[method].params.model_fields else {}
    if method == "breadcrumbs":
        params["gamma"] = 0.0
    rank = FULL if method not in ("linear", "task_arithmetic", "cat", "factor_linear") else None
    result = merge([sources[0]], method, [1.0], params, rank=rank)
    check_against(result, raw[:1], lambda ts, _: ts[0])


def test_plus_and_minus_the_same_adapter_is_zero(sources) -> None:
    result = merge([sources[0], sources[0]], "linear", [1.0, -1.0])
    assert all(m.rank == 0 for m in result.report)
    assert all(d.dense().abs().max() == 0 for d in result.adapter.modules.values())


def test_refusals(sources) -> None:
    with pytest.raises(RecipeError, match="unknown method 'tie'.*valid methods: linear"):
        merge(sources, "tie")
    with pytest.raises(RecipeError, match="density: Input should be less than or equal to 1"):
        merge(sources, "ties", parameters={"density": 1.5})
    with pytest.raises(RecipeError, match="dens: unknown parameter .*valid parameters: density"):
        merge(sources, "ties", parameters={"dens": 0.5})
    with pytest.raises(RecipeError, match="exactly 2 sources"):
        merge(sources, "slerp")
    with pytest.raises(RecipeError, match="2 weights for 4 sources"):
        merge(sources, "linear", [1.0, 2.0])
    with pytest.raises(RecipeError, match="rank must be a positive integer"):
        merge(sources, "svd", rank=0)
    with pytest.raises(RecipeError, match="cat keeps every source's rank"):
        merge(sources, "cat", rank=4)
    with pytest.raises(IncompatibleAdaptersError, match="factor_linear needs equal ranks"):
        merge(sources, "factor_linear")
    with pytest.raises(RecipeError, match="slerp interpolates with parameter t"):
        merge(sources[:2], "slerp", [0.5, 0.5])
    with pytest.raises(RecipeError, match="at least one source"):
        merge([], "linear")
