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
from adapter_fusion.merge import driver
from adapter_fusion.merge.method_types import ModuleSources

WEIGHTS = [0.6, -0.4, 0.8, 0.5]
EPS32 = torch.finfo(torch.float32).eps  # 2^-23, twice the unit roundoff u of float32
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


TALL = 300  # rows: more than two of the merge's row blocks, the last one partial


class Tall(torch.nn.Module):
    """Two linear maps whose outputs span several row blocks (the tiny Llama's fit in one)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(24, TALL, bias=False)
        self.gate = torch.nn.Linear(40, TALL, bias=False)


@pytest.fixture(scope="module")
def tall_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four real PEFT adapters on `Tall`, of different ranks and scales (one rsLoRA)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tall")
    for seed, (r, alpha, rslora) in enumerate([(4, 8, False), (4, 16, False), (8, 8, True), (2, 4, False)]):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj", "gate"], init_lora_weights=False
        )
        get_peft_model(Tall(), config).save_pretrained(root / str(seed))
    return [root / str(seed) for seed in range(4)]


@pytest.fixture(scope="module")
def tall_sources(tall_adapters: list[Path]):
    blocks = [b.stop - b.start for b in ModuleSources("proj", (TALL, 24), [], [], 0).row_blocks()]
    assert len(blocks) >= 3 and blocks[-1] < blocks[0], blocks  # what the tall modules are for
    return [load_adapter(p) for p in tall_adapters]


@pytest.fixture(scope="module")
def tall_raw(tall_adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [raw_deltas(p) for p in tall_adapters]


def stacked(raw: list[dict[str, torch.Tensor]], path: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    return [r.get(path, torch.zeros(shape)) for r in raw]


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - y.double()) / max(torch.linalg.norm(y.double()), 1e-30))


def check_against(result, raw, rule) -> None:
    """Every output module equals rule(list of dense source deltas, path), relative (Frobenius), to
    max(out, in)·eps32 = 2m·u. The largest error is re-factoring: an SVD (fp32 for the elementwise
    methods, exact at this rank but for rounding) by Householder reflections, each backward stable
    to c·m·u of ‖ΔW‖ (Higham, Accuracy and Stability, Lemma 19.3), whose errors, of random sign, add
    about √n-fold over the n reflections. Forming B @ A and the reference's own fp32 add a few u.
    """
    assert set(result.adapter.modules) == set().union(*raw)
    for path, delta in result.adapter.modules.items():
        shape = next(r[path].shape for r in raw if path in r)
        expected = rule(stacked(raw, path, shape), path)
        assert delta.shape == tuple(expected.shape)
        assert relative_difference(delta.dense(), expected) < max(shape) * EPS32, path


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
    assert all(m.relative_error == 0.0 for m in result.report)  # nothing was cut, and the report says so exactly
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


def test_truncation_in_batches_gives_the_same_merge(sources, monkeypatch: pytest.MonkeyPatch) -> None:
    """Low-rank results wait to be truncated together, in batches of at most PENDING_BYTES: a
    batch per module gives the same factors and report as one batch for the whole merge."""
    whole = merge(sources, "svd", WEIGHTS, rank=6)
    monkeypatch.setattr(driver, "PENDING_BYTES", 1)
    per_module = merge(sources, "svd", WEIGHTS, rank=6)
    assert [m.rank for m in whole.report] == [m.rank for m in per_module.report]
    for a, b in zip(whole.report, per_module.report):  # computed in float64 either way
        assert a.path == b.path and abs(a.energy_kept - b.energy_kept) < 1e-12 and abs(a.relative_error - b.relative_error) < 1e-9
    for path, delta in whole.adapter.modules.items():  # float32 factors from float64: at most a rounding apart
        torch.testing.assert_close(delta.B, per_module.adapter.modules[path].B, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(delta.A, per_module.adapter.modules[path].A, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["svd", "ties"])  # low-rank results truncated in batches; dense ones factored at once
def test_progress_reports_each_module_once_when_it_is_final(method, sources, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "PENDING_BYTES", 1 << 12)  # a few modules per batch
    calls: list[tuple[int, int, str]] = []
    result = merge(sources, method, WEIGHTS, rank=4, on_module=lambda done, total, path: calls.append((done, total, path)))
    modules = sorted(result.adapter.modules)
    assert [done for done, _, _ in calls] == list(range(1, len(modules) + 1)) and {total for _, total, _ in calls} == {len(modules)}
    assert sorted(path for _, _, path in calls) == modules


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
    weights = [0.7, 0.2]
    result = merge(sources[:2], "factor_linear", weights)
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in tiny_adapters[:2]]
    tensors = [load_file(p / "adapter_model.safetensors") for p in tiny_adapters[:2]]
    roots = [math.sqrt(c["lora_alpha"] / c["r"]) for c in configs]  # the scale, split over both factors

    def combined(path: str, factor: str, magnitudes: bool = False) -> torch.Tensor:
        """Σ w·√s·factor over the sources; with `magnitudes`, Σ |w|·√s·|factor| (for the bound)."""
        terms = [(w, s, t[f"base_model.model.{path}.lora_{factor}.weight"]) for w, s, t in zip(weights, roots, tensors)]
        return sum(abs(w) * s * f.abs() if magnitudes else w * s * f for w, s, f in terms)

    for path, delta in result.adapter.modules.items():
        # Both sides form Σ w·√s·B and Σ w·√s·A with at most 4 roundings a term (√s to fp32 and the
        # product, ·w, +): within 4u·(Σ|w|√s|B|) elementwise, likewise for A. The product of the two
        # (r terms) adds γ_r ≈ r·u of |B|@|A|, so each side is within (r + 8)·u·(|B|@|A|) of exact,
        # and the two within (r + 8)·eps32·(|B|@|A|).
        bound = (delta.rank + 8) * EPS32 * (combined(path, "B", True) @ combined(path, "A", True))
        assert ((delta.dense() - combined(path, "B") @ combined(path, "A")).abs() <= bound).all(), path


# ---- elementwise methods (dense per module) ---------------------------------------------------


def dare_drop(ts: list[torch.Tensor], path: str, seed: int, density: float) -> list[torch.Tensor]:
    """Each source's whole tensor, dropped with its own seeded generator and rescaled."""
    return [t * (torch.rand(t.shape, generator=gen(seed, path, i)) < density) / density for i, t in enumerate(ts)]


def crumbs(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: skip the gamma fraction of largest magnitudes, keep the next density fraction."""
    order = t.abs().flatten().argsort(descending=True)
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[order[int(gamma * t.numel()) : int(gamma * t.numel()) + int(density * t.numel())]] = True
    return t * keep.view_as(t)


def della_drop(ts: list[torch.Tensor], path: str, seed: int, density: float, epsilon: float) -> list[torch.Tensor]:
    """Keep probability linear in magnitude rank, density ± epsilon/2; survivors divided by it."""
    dropped = []
    for i, t in enumerate(ts):
        n = t.numel()
        rank_of = torch.empty(n)
        rank_of[t.abs().flatten().argsort()] = torch.arange(n, dtype=torch.float32)
        p = density - epsilon / 2 + epsilon * rank_of / (n - 1)
        keep = torch.rand(n, generator=gen(seed, path, i)) < p
        dropped.append((t.flatten() * keep / p).view_as(t))
    return dropped


def weighted(ts: list[torch.Tensor]) -> torch.Tensor:
    return sum(w * t for w, t in zip(WEIGHTS, ts))


# method: (parameters, seed, dense reference rule(list of source deltas, module path))
ELEMENTWISE = {
    "ties": (
        {"density": 0.4, "majority_sign": "frequency", "divide_by": "weights"},
        0,
        lambda ts, _: ties_rule([keep_top(t, 0.4) for t in ts], WEIGHTS, "weights", "frequency"),
    ),
    "magnitude_prune": ({"density": 0.3}, 0, lambda ts, _: weighted([keep_top(t, 0.3) for t in ts])),
    "dare_linear": ({"density": 0.6}, 7, lambda ts, path: weighted(dare_drop(ts, path, 7, 0.6))),
    "dare_ties": ({"density": 0.5}, 3, lambda ts, path: ties_rule(dare_drop(ts, path, 3, 0.5), WEIGHTS)),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.1}, 0, lambda ts, _: weighted([crumbs(t, 0.5, 0.1) for t in ts])),
    "della": (
        {"density": 0.6, "epsilon": 0.2, "lambda": 1.5},  # smallest kept with p = 0.5, largest with 0.7
        5,
        lambda ts, path: 1.5 * ties_rule(della_drop(ts, path, 5, 0.6, 0.2), WEIGHTS),
    ),
}


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_elementwise_matches_reference(method, sources, raw) -> None:
    params, seed, rule = ELEMENTWISE[method]
    check_against(merge(sources, method, WEIGHTS, params, rank=FULL, seed=seed), raw, rule)


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_elementwise_across_row_blocks(method, tall_sources, tall_raw) -> None:
    """Rules run block by block of rows, but thresholds are per whole tensor and drops are drawn in
    row order: on modules of several blocks the result still equals the whole-tensor reference."""
    params, seed, rule = ELEMENTWISE[method]
    check_against(merge(tall_sources, method, WEIGHTS, params, rank=FULL, seed=seed), tall_raw, rule)


def test_dare_is_seeded(sources) -> None:
    path = "model.layers.1.mlp.up_proj"
    first, again, other = (
        merge(sources, "dare_linear", WEIGHTS, {"density": 0.6}, rank=FULL, seed=seed).adapter.modules[path].dense()
        for seed in (7, 7, 8)
    )
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_refactoring_error_is_near_the_optimum(sources, raw) -> None:
    result = merge(sources, "ties", WEIGHTS, {"density": 0.5}, rank=8)
    for module in result.report:
        ts = stacked(raw, module.path, result.adapter.modules[module.path].shape)
        S = torch.linalg.svdvals(ties_rule([keep_top(t, 0.5) for t in ts], WEIGHTS).double())
        optimum = float(S[8:].square().sum().sqrt() / S.square().sum().sqrt())
        # A quality claim, not arithmetic: the randomized range finder (16 extra directions, 4 power
        # iterations) must come within 1% of Eckart–Young, where Halko et al. (2011, Thm 10.5) promise
        # √(1 + r/15) = 1.24x in expectation without power iterations. At errors >= 0.1, 1% dwarfs
        # the rounding of the reported √(1 − kept/total) from fp32 energies (~u/error ≈ 1e-6).
        assert optimum >= 0.1 and module.relative_error <= optimum * 1.01


# ---- identities and refusals ------------------------------------------------------------------


# slerp takes two sources, model_stock at least two (their angle sets the ratio); della drops
# entries at every density below 1 by design; the data-aware methods need examples
# (test_data_merges.py, test_learned.py).
@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.data is None and m not in ("slerp", "della", "model_stock")])
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
