"""Pure elementwise merge primitives on dense task tensors; no modules, no I/O.

Stacked tensors are (n_sources, out, in). Semantics follow PEFT's `merge_utils` unless a
docstring says otherwise, so the `*_svd` methods can be checked against PEFT directly.
"""

from __future__ import annotations

from typing import Literal

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

SignRule = Literal["total", "frequency"]
Divisor = Literal["count", "weights", "none"]
ZeroDivisor = Literal["zero", "one"]


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest (1-based) of non-negative float32 values, exactly, in two passes.

    Non-negative floats order like their bit patterns, so a histogram of the top 16 bits finds
    the bucket holding the k-th value, and only that bucket is searched. About 2x faster than
    `kthvalue` and 2.5x faster than `topk` on a 45M-entry Llama-7B MLP delta.
    """
    flat = values.reshape(-1).float().contiguous()
    high = flat.view(torch.int32) >> 16  # (n,) in 0..32767: the sign bit is 0
    above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0).flip(0)  # above[b] = #(high >= b)
    bucket = int((above >= k).nonzero().max())
    higher = int(above[bucket + 1]) if bucket + 1 < above.numel() else 0
    inside = flat[high == bucket]
    return inside.kthvalue(inside.numel() - (k - higher) + 1).values


def kth_largest_streamed(blocks: Callable[[], Iterator[Tensor]], n: int, k: int, sample: Tensor) -> float:
    """The k-th largest of n non-negative values that arrive in blocks, exactly, in one pass.

    A sample brackets the k-th value; one pass counts the values above the bracket and keeps
    the few inside it, which decide exactly. If the sample misled (rare), the bracket widens.
    """
    ordered = sample.reshape(-1).sort().values
    m = ordered.numel()
    margin = 0.01 + 4.0 / m**0.5
    q = 1.0 - k / n
    for widen in (1, 4, None):
        if widen is None:  # fall back to everything: exact, slower
            return float(kth_largest(torch.cat([b.reshape(-1) for b in blocks()]), k))
        lo = ordered[max(int((q - widen * margin) * m), 0)] if q - widen * margin > 0 else torch.tensor(0.0)
        hi = ordered[min(int((q + widen * margin) * m), m - 1)] if q + widen * margin < 1 else torch.tensor(float("inf"))
        above, inside = 0, []
        for block in blocks():
            above += int((block >= hi).sum())
            inside.append(block[(block >= lo) & (block < hi)])
        middle = torch.cat(inside)
        if above < k <= above + middle.numel():
            return float(middle.kthvalue(middle.numel() - (k - above) + 1).values)
    raise AssertionError("unreachable")


def keep_band(t: Tensor, low: float, high: float = float("inf")) -> Tensor:
    """Keep entries with low <= |value| < high: magnitude pruning (high = inf) and Breadcrumbs."""
    magnitude = t.abs()
    keep = magnitude >= low
    if high != float("inf"):
        keep &= magnitude < high
    return torch.where(keep, t, 0.0)


def prune_random(t: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability `density`, divide survivors by `density` (exact 1/(1-p))."""
    if density >= 1.0:
        return t
    keep = torch.rand(t.shape, generator=generator) < density
    out = t * keep
    return out / density if rescale else out


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


def disjoint_merge(
    stacked: Tensor, weights: Tensor, agree: Tensor, divide_by: Divisor = "count", zero_divisor: ZeroDivisor = "zero"
) -> Tensor:
    """Σ w_i·t_i over agreeing sources, divided by how many agree (`count`, PEFT), by the sum of
    their weights (`weights`, mergekit's `normalize: true`) or not at all (`none`, mergekit's
    `normalize: false`). Where the agreeing weights sum to 0, `zero_divisor` gives 0 (`zero`) or
    divides by 1 as mergekit does (`one`, which keeps the agreeing sum)."""
    total = weighted_sum(torch.where(agree, stacked, 0.0), weights)
    if divide_by == "none":
        return total
    if divide_by == "count":
        return total / agree.sum(dim=0, dtype=stacked.dtype).clamp(min=1)
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))  # (n, 1, 1)
    norm = (w * agree).sum(dim=0)
    nonzero = norm != 0
    divided = total / torch.where(nonzero, norm, 1.0)
    return divided if zero_divisor == "one" else torch.where(nonzero, divided, 0.0)


def l1_rescale_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's norm-matching rescale after a drop: ‖t‖₁ / ‖t ⊙ mask‖₁, or 1 when either norm
    is below `eps` (mergekit's guard), in place of DARE's exact 1/density."""
    return 1.0 if before < eps or after < eps else before / after


def weighted_sum(stacked: Tensor, weights: Tensor) -> Tensor:
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)  # Σ_n w_n · stacked[n]
