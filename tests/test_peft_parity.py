"""Our merges against PEFT's `add_weighted_adapter` on the same adapters, module by module.

PEFT's `linear` is a factor-space rule ((Σ√|w|·B)(Σ sign(w)√|w|·A)); ours is the exact delta sum,
and PEFT's rule is our `factor_linear` with weight_split=sqrt. PEFT's `*_svd` variants apply the
elementwise rules to dense deltas, as ours do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from adapter_fusion import load_adapter, merge

WEIGHTS = [0.6, -0.4, 0.8, 0.5]
NAMES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def peft_model(tiny_base: Path, tiny_adapters: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapters[0], adapter_name="a")
    for name, path in zip(NAMES[1:], tiny_adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    return model


def peft_merge(model: PeftModel, out: str, names: list[str], weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    model.add_weighted_adapter(names, weights, out, **kwargs)
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and out in module.lora_A:
            deltas[path] = module.get_delta_weight(out).detach()
    return deltas


def assert_same(ours, theirs: dict[str, torch.Tensor], tol: float) -> None:
    assert set(ours.adapter.modules) == set(theirs)
    for path, expected in theirs.items():
        got = ours.adapter.modules[path].dense()
        diff = float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))
        assert diff < tol, f"{path}: relative difference {diff:.2e}"


@pytest.fixture(scope="module")
def sources(tiny_adapters: list[Path]):
    return [load_adapter(p) for p in tiny_adapters]


def test_cat(peft_model, sources) -> None:
    assert_same(merge(sources, "cat", WEIGHTS), peft_merge(peft_model, "cat", NAMES, WEIGHTS, combination_type="cat"), 1e-6)


def test_svd_exact_truncation(peft_model, sources) -> None:
    theirs = peft_merge(peft_model, "svd6", NAMES, WEIGHTS, combination_type="svd", svd_rank=6)
    assert_same(merge(sources, "svd", WEIGHTS, rank=6), theirs, 1e-5)


def test_linear_is_peft_cat_and_peft_linear_is_factor_linear_sqrt(peft_model, sources) -> None:
    theirs_cat = peft_merge(peft_model, "cat2", NAMES, WEIGHTS, combination_type="cat")
    assert_same(merge(sources, "linear", WEIGHTS), theirs_cat, 1e-5)
    same_rank = ["a", "b", "d"]  # PEFT's linear needs equal ranks
    theirs = peft_merge(peft_model, "lin", same_rank, [0.6, -0.4, 0.5], combination_type="linear")
    ours = merge([sources[0], sources[1], sources[3]], "factor_linear", [0.6, -0.4, 0.5], {"weight_split": "sqrt"})
    assert_same(ours, theirs, 1e-5)


@pytest.mark.parametrize(
    ("ours", "theirs", "params"),
    [
        ("ties", "ties_svd", {"density": 0.4, "majority_sign": "total"}),
        ("ties", "ties_svd", {"density": 0.4, "majority_sign": "frequency"}),
        ("magnitude_prune", "magnitude_prune_svd", {"density": 0.3}),
        ("dare_linear", "dare_linear_svd", {"density": 1.0}),  # PEFT's DARE is unseeded: compare without drops
        ("dare_ties", "dare_ties_svd", {"density": 1.0}),
    ],
)
def test_dense_methods_match_peft_svd_variants(peft_model, sources, ours, theirs, params) -> None:
    out = f"{theirs}-{params.get('majority_sign', '')}"
    kwargs = {"density": params["density"]}
    if "majority_sign" in params:
        kwargs["majority_sign_method"] = params["majority_sign"]
    full = 64  # the whole spectrum: compares the merge rule itself, not the truncation
    expected = peft_merge(
        peft_model, out, NAMES, WEIGHTS, combination_type=theirs, svd_rank=full, svd_full_matrices=False, **kwargs
    )
    assert_same(merge(sources, ours, WEIGHTS, params, rank=full), expected, 1e-5)
