"""Pure elementwise merge primitives on dense task tensors; no modules, no I/O.

Stacked tensors are (n_sources, out, in). Semantics follow PEFT's `merge_utils` unless a
docstring says otherwise, so the `*_svd` methods can be checked against PEFT directly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SignRule = Literal["total", "frequency"]
Divisor = Literal["count", "weights"]


def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """Keep the int(density·numel) entries of largest |value| (per tensor, as PEFT and TIES)."""
    if density >= 1.0:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return t * keep.view_as(t)


def prune_random(t: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability `density`, divide survivors by `density` (exact 1/(1-p))."""
    if density >= 1.0:
        return t
    keep = torch.rand(t.shape, generator=generator) < density
    out = t * keep
    return out / density if rescale else out


def prune_breadcrumbs(t: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest |values| (outliers) and keep the next
    `density` fraction; everything smaller is dropped too."""
    n = t.numel()
    top = int(gamma * n)
    keep_n = min(int(density * n), n - top)
    flat = t.reshape(-1)
    order = flat.abs().argsort(descending=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[top : top + keep_n]] = True
    return t * keep.view_as(t)


def prune_magnitude_ranked(t: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """DELLA's MAGPRUNE: keep probability rises linearly with magnitude rank, from density−ε/2
    (smallest) to density+ε/2 (largest); each survivor is divided by its own keep probability."""
    n = t.numel()
    flat = t.reshape(-1)
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[flat.abs().argsort()] = torch.arange(n, dtype=torch.float32)
    p_keep = density - epsilon / 2 + epsilon * ranks / max(n - 1, 1)
    keep = torch.rand(n, generator=generator) < p_keep
    return (flat * keep / p_keep).view_as(t)


def majority_sign_mask(stacked: Tensor, rule: SignRule = "total") -> Tensor:
    """TIES sign election: per entry, the sign of the summed values (`total`) or of the summed
    signs (`frequency`), ties going to +; returns which sources agree with it (zeros never do)."""
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if rule == "total" else signs.sum(dim=0)
    elected = torch.where(mass >= 0, 1.0, -1.0)
    return signs == elected


def disjoint_merge(stacked: Tensor, weights: Tensor, agree: Tensor, divide_by: Divisor = "count") -> Tensor:
    """Σ w_i·t_i over agreeing sources, divided by how many agree (`count`, PEFT) or by the sum of
    their weights (`weights`, mergekit's normalisation)."""
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))  # (n, 1, 1)
    total = (stacked * w * agree).sum(dim=0)
    if divide_by == "count":
        return total / agree.sum(dim=0).clamp(min=1)
    norm = (w * agree).sum(dim=0)
    return torch.where(norm.abs() > 0, total / torch.where(norm.abs() > 0, norm, 1.0), 0.0)


def weighted_sum(stacked: Tensor, weights: Tensor) -> Tensor:
    return torch.einsum("n...,n->...", stacked, weights)
