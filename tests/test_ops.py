"""The pure merge primitives, tested directly: hand-made cases and PEFT's own functions."""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from adapter_fusion.merge import _ops


def test_keep_band_keeps_magnitudes_in_range() -> None:
    t = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert torch.equal(_ops.keep_band(t, 2.0), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert torch.equal(_ops.keep_band(t, 0.0), t)
    assert torch.equal(_ops.keep_band(t, 0.5, 3.0), torch.tensor([[0.0, 0.0], [2.0, -0.5]]))


def test_prune_random_is_seeded_and_rescales() -> None:
    t = torch.ones(200, 200)
    a = _ops.prune_random(t, 0.3, torch.Generator().manual_seed(1))
    b = _ops.prune_random(t, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a.unique(), torch.tensor([0.0, 1 / 0.3]))
    # expectation preserved: the mean of n = 40000 kept/p has sd √((1-p)/(p·n)) = 0.0076, so 0.05 is 6.5 sd
    assert abs(float(a.mean()) - 1.0) < 0.05


def test_magnitude_ranked_drop_keeps_large_entries_more_often() -> None:
    t = torch.linspace(0.01, 1.0, 10000)
    out = _ops.prune_magnitude_ranked(t, density=0.5, epsilon=0.4, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    # keep probability 0.3 + 0.4·rank/(n-1): 0.32 on average over the smallest 1000, 0.68 over the
    # largest; a mean of 1000 draws has sd 0.015 there, so 0.4 and 0.6 are 5.4 sd away
    assert kept[:1000].float().mean() < 0.4 < 0.6 < kept[-1000:].float().mean()
    # rescaling keeps the expectation: Σ t·keep/p has sd √(Σ t²(1-p)/p) = 0.0096·Σt, so 0.05 is 5.2 sd
    assert abs(float(out.sum() / t.sum()) - 1.0) < 0.05


def test_sign_election_and_disjoint_merge_match_peft() -> None:
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(4, 30, 20, generator=g) * (torch.rand(4, 30, 20, generator=g) > 0.4)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.3])
    for rule in ("total", "frequency"):
        agree = _ops.majority_sign_mask(stacked, rule)
        assert torch.equal(agree, merge_utils.calculate_majority_sign_mask(stacked, method=rule))
        ours = _ops.disjoint_merge(stacked, weights, agree)
        theirs = merge_utils.disjoint_merge(stacked * weights.view(-1, 1, 1), agree)
        torch.testing.assert_close(ours, theirs)


def test_disjoint_merge_by_weights_is_a_weighted_mean() -> None:
    stacked = torch.tensor([[1.0, -1.0], [3.0, 2.0]])
    agree = torch.tensor([[True, False], [True, True]])
    out = _ops.disjoint_merge(stacked, torch.tensor([1.0, 3.0]), agree, divide_by="weights")
    torch.testing.assert_close(out, torch.tensor([(1 + 9) / 4, 6 / 3]))


def test_weighted_sum() -> None:
    stacked = torch.arange(12.0).view(3, 2, 2)
    torch.testing.assert_close(_ops.weighted_sum(stacked, torch.tensor([1.0, 0.0, -1.0])), stacked[0] - stacked[2])


def test_kth_largest_is_exact() -> None:
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).abs()
    values[:10] = 0.0
    ordered = values.sort(descending=True).values
    for k in (1, 2, 777, 50_000, 99_990, 100_000):
        assert _ops.kth_largest(values, k) == ordered[k - 1], k


def test_streamed_kth_largest_is_exact_even_when_the_sample_misleads() -> None:
    values = torch.randn(50_000, generator=torch.Generator().manual_seed(2)).abs()
    ordered = values.sort(descending=True).values

    def blocks():
        return iter(values.split(4096))

    for k in (1, 3, 1000, 25_000, 49_999, 50_000):
        assert _ops.kth_largest_streamed(blocks, values.numel(), k, values[:2000]) == float(ordered[k - 1]), k
    misleading = torch.zeros(100)  # a sample of zeros brackets nothing useful: the fallback still finds it
    assert _ops.kth_largest_streamed(blocks, values.numel(), 777, misleading) == float(ordered[776])


def test_disjoint_merge_without_division_and_with_a_zero_divisor() -> None:
    stacked = torch.tensor([[2.0, 1.0], [2.0, -4.0]])  # (n=2, entries)
    weights = torch.tensor([1.0, -1.0])
    agree = torch.tensor([[True, True], [True, False]])
    # entry 0: both agree, weights sum to 0; entry 1: only source 0, weight sum 1
    none = _ops.disjoint_merge(stacked, weights, agree, divide_by="none")
    torch.testing.assert_close(none, torch.tensor([0.0, 1.0]))
    stacked = torch.tensor([[2.0, 1.0], [3.0, -4.0]])
    zero = _ops.disjoint_merge(stacked, weights, agree, divide_by="weights", zero_divisor="zero")
    one = _ops.disjoint_merge(stacked, weights, agree, divide_by="weights", zero_divisor="one")
    torch.testing.assert_close(zero, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(one, torch.tensor([2.0 - 3.0, 1.0]))  # the agreeing sum, divided by 1


def test_l1_rescale_factor_and_its_guard() -> None:
    assert _ops.l1_rescale_factor(6.0, 2.0) == 3.0
    assert _ops.l1_rescale_factor(6.0, 0.0) == 1.0  # nothing kept: mergekit leaves the (zero) tensor
    assert _ops.l1_rescale_factor(5e-8, 1e-8) == 1.0  # below mergekit's eps = 1e-7
