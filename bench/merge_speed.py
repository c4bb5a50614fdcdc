"""Merge speed on one Llama-7B-shaped layer: ours vs PEFT's `add_weighted_adapter`, one run.

    python bench/merge_speed.py [--methods svd ties dare] [--rank 16] [--adapters 4]

Same random rank-16 adapters for both (written by PEFT, loaded by us). For each method it prints
both times, the speed-up, the largest relative difference of the results over modules
(Frobenius), and, for the module where ours is relatively worst, the truncation error of PEFT's
and of our result against the same dense merge M, next to the optimum (the error of the best
rank-r approximation of M, from its top singular values in float64).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from adapter_fusion import load_adapter, merge
from adapter_fusion.merge import get_method, parse_parameters
from adapter_fusion.merge.method_types import ModuleSources

SHAPES = {  # (out, in) of one Llama-7B decoder layer
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
CASES = {  # ours, PEFT's, parameters (density as in the papers' usual settings)
    "svd": ("svd", "svd", {}),
    "ties": ("ties", "ties_svd", {"density": 0.2}),
    "dare": ("dare_linear", "dare_linear_svd", {"density": 0.5}),
}


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (out, inp) in SHAPES.items():
            setattr(self, name, nn.Linear(inp, out, bias=False))


def build(n: int, rank: int, root: Path):
    torch.manual_seed(0)
    config = dict(r=rank, lora_alpha=2 * rank, target_modules=list(SHAPES), init_lora_weights=False)
    model = get_peft_model(Layer(), LoraConfig(**config), adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(root)  # non-default adapters land in root/<name>
    return model, [load_adapter(root / f"t{i}") for i in range(n)]


def peft_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {
        path.removeprefix("base_model.model."): m.get_delta_weight(name).detach()
        for path, m in model.named_modules()
        if isinstance(m, LoraLayer) and name in m.lora_A
    }


def optimum_error(dense: torch.Tensor, rank: int) -> float:
    """Eckart-Young: sqrt(‖M‖² − Σ_{i<=r} σ_i²) / ‖M‖. Only the top r singular values are needed:
    a float64 subspace iteration with 4r columns and 12 iterations pins them to ~1e-10."""
    M = dense.double()
    _, S, _ = torch.svd_lowrank(M, q=min(4 * rank, *M.shape), niter=12)
    total = float(M.square().sum())
    return max(total - float(S[:rank].square().sum()), 0.0) ** 0.5 / total**0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model, sources = build(args.adapters, args.rank, Path(tmp))
    names = [f"t{i}" for i in range(args.adapters)]
    weights = [1.0 / args.adapters + 0.1 * i for i in range(args.adapters)]
    print(f"one Llama-7B layer (7 modules), {args.adapters} adapters of rank {args.rank}, {torch.get_num_threads()} threads")
    header = (
        f"{'method':8} {'peft s':>8} {'ours s':>8} {'speed-up':>9} {'rel diff':>9} {'peft err':>9} {'our err':>9} "
        f"{'optimum':>9} {'ours/opt':>9}"
    )
    print(header)
    for case in args.methods:
        ours_name, peft_name, params = CASES[case]
        start = time.perf_counter()
        model.add_weighted_adapter(names, weights, f"m_{case}", combination_type=peft_name, svd_rank=args.rank, **params)
        peft_seconds = time.perf_counter() - start
        theirs = peft_deltas(model, f"m_{case}")
        start = time.perf_counter()
        result = merge(sources, ours_name, weights, params, rank=args.rank)
        our_seconds = time.perf_counter() - start

        diff = max(
            float(torch.linalg.norm(result.adapter.modules[p].dense() - theirs[p]) / torch.linalg.norm(theirs[p]))
            for p in theirs
        )
        # Truncation error of each result against the same dense merge M, and the optimum (Eckart-Young).
        # For DARE, PEFT's masks come from the global RNG, so only our error is comparable to M.
        method = get_method(ours_name)
        worst = (0.0, 0.0, 0.0, float("nan"))
        for m in result.report:
            group = ModuleSources(m.path, result.adapter.modules[m.path].shape, [s.modules[m.path] for s in sources], weights, 0)
            combined = method.combine(group, parse_parameters(method, params))
            M = (combined.dense() if hasattr(combined, "dense") else combined).double()
            norm = float(torch.linalg.norm(M))
            ours_err = float(torch.linalg.norm(M - result.adapter.modules[m.path].dense().double())) / norm
            peft_err = float(torch.linalg.norm(M - theirs[m.path].double())) / norm if case != "dare" else float("nan")
            best = optimum_error(M, args.rank)
            if ours_err / best > worst[0]:
                worst = (ours_err / best, ours_err, best, peft_err)
        ratio, ours_error, optimum, peft_error = worst
        print(
            f"{case:8} {peft_seconds:8.2f} {our_seconds:8.2f} {peft_seconds / our_seconds:8.1f}x "
            f"{diff:9.2e} {peft_error:9.6f} {ours_error:9.6f} {optimum:9.6f} {ratio:9.6f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
