"""mergekit's merge rules written out plainly from its source (mergekit/merge_methods/
generalized_task_arithmetic.py `GTATask.execute`, `get_mask`; mergekit/sparsify.py), on dense
deltas (the base's tensors are 0). Read, not copied; shared by the parity tests.

mergekit draws DARE's mask unseeded (torch.bernoulli); the references take a generator so that
the rule, not the draw, is compared."""

from __future__ import annotations

from collections.abc import Callable

import torch


def mergekit_gta(
    ts: list[torch.Tensor], weights: list[float], sparsify: Callable[[torch.Tensor, int], torch.Tensor], consensus: bool, normalize: bool, lam: float = 1.0
) -> torch.Tensor:
    """λ·(Σ w·δ over the sign-agreeing sources [consensus 'sum', elected on w·δ]) / divisor."""
    deltas = torch.stack([sparsify(t, i) for i, t in enumerate(ts)])  # (n, out, in)
    w = torch.tensor(weights).view(-1, 1, 1)
    weighted = deltas * w
    if consensus:  # get_mask(weighted, "sum")
        majority = (weighted.sum(dim=0) >= 0).float() * 2 - 1
        mask = weighted.sign() == majority
        mixed, divisor = (weighted * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(dim=0), w.sum(dim=0).expand_as(weighted[0]).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return lam * mixed


def mergekit_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    mask = torch.zeros_like(t)
    mask.view(-1)[t.abs().view(-1).argsort(descending=True)[:k]] = 1
    return t * mask


def mergekit_l1_drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    masked = t * (torch.rand(t.shape, generator=generator) < density)
    before, after = t.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)




def mergekit_outliers(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """sparsify.magnitude_outliers: drop the gamma fraction of largest, keep `density` in all.
    (With int(gamma·n) = 0 mergekit's slice [n_bot:-0] keeps nothing; callers avoid that case.)"""
    n = t.numel()
    n_top, n_bot = int(gamma * n), n - int(density * n) - int(gamma * n)
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    mask = torch.zeros_like(t)
    mask.view(-1)[t.abs().view(-1).sort().indices[n_bot:-n_top]] = 1
    return t * mask


def stock_reference(ts: list[torch.Tensor], average: str, rows: bool) -> torch.Tensor:
    """Model Stock on dense deltas, as mergekit's ModelStockMergeTask does it (base = 0)."""
    flat = [t.double() if rows else t.double().view(1, -1) for t in ts]  # (rows, entries)
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            product = flat[i].norm(dim=-1) * flat[j].norm(dim=-1)
            cos = torch.where(product > 0, (flat[i] * flat[j]).sum(dim=-1) / product, 0.0).clamp(-1, 1)
            cosines.append(cos)
    stacked = torch.stack(cosines)
    cos = (stacked.mean(0) if average == "cosine" else stacked.acos().mean(0).cos()).unsqueeze(-1)
    k = len(ts)
    t = k * cos / (1 + (k - 1) * cos)
    return (t * sum(flat) / k).view_as(ts[0]).float()
