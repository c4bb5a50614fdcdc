"""Properties of the low-rank algebra against dense references (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_fusion.delta import LowRankDelta, inner, truncate_all


def random_delta(seed: int, out: int, inp: int, rank: int) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g))


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 4))
def test_concat_is_the_sum(shape: tuple[int, int, int, int], n: int) -> None:
    out, inp, rank, seed = shape
    deltas = [random_delta(seed + i, out, inp, rank) for i in range(n)]
    total = LowRankDelta.concat(deltas)
    assert total.rank == n * rank
    torch.testing.assert_close(total.dense(), sum(d.dense() for d in deltas), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 30))
def test_truncate_at_or_above_full_rank_is_exact(shape: tuple[int, int, int, int], extra: int) -> None:
    out, inp, rank, seed = shape
    delta = random_delta(seed, out, inp, rank)
    kept, report = delta.truncate(rank + extra)
    assert kept.rank == min(rank, out, inp)
    torch.testing.assert_close(kept.dense(), delta.dense(), rtol=1e-5, atol=1e-4)
    assert report.relative_error < 1e-6 and abs(report.energy_kept - 1.0) < 1e-9


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 12))
def test_truncation_error_equals_the_tail_singular_values(shape: tuple[int, int, int, int], target: int) -> None:
    out, inp, rank, seed = shape
    delta = random_delta(seed, out, inp, 2 * rank)
    kept, report = delta.truncate(target)
    W = delta.dense().double()
    S = torch.linalg.svdvals(W)
    tail = S[target:].square().sum().sqrt() / S.square().sum().sqrt()
    assert kept.rank == min(target, 2 * rank, out, inp)
    assert abs(report.relative_error - float(tail)) < 1e-5
    actual = torch.linalg.norm(W - kept.dense().double()) / torch.linalg.norm(W)
    assert abs(float(actual) - float(tail)) < 1e-4  # Eckart–Young: the optimum is reached


def test_cancelling_sources_give_rank_zero() -> None:
    delta = random_delta(0, 30, 20, 6)
    kept, report = LowRankDelta.concat([delta, delta.scaled(-1.0)]).truncate()
    assert kept.rank == 0 and kept.shape == (30, 20)
    assert report.relative_error == 0.0


def test_inner_and_norm_match_dense() -> None:
    x, y = random_delta(1, 50, 30, 5), random_delta(2, 50, 30, 3)
    assert abs(inner(x, y) - float((x.dense() * y.dense()).sum())) < 1e-3
    assert abs(x.frobenius_norm() - float(torch.linalg.norm(x.dense()))) < 1e-3


def test_from_dense_randomized_is_near_exact() -> None:
    delta = LowRankDelta.concat([random_delta(i, 300, 200, 8) for i in range(4)])
    W = delta.dense() + 0.01 * torch.randn(300, 200, generator=torch.Generator().manual_seed(9))
    fast, fast_report = LowRankDelta.from_dense(W, 16)
    exact, exact_report = LowRankDelta.from_dense(W, 16, exact=True)
    # the reported error is the true error of what is returned
    true_error = float(torch.linalg.norm(W - fast.dense()) / torch.linalg.norm(W))
    assert abs(fast_report.relative_error - true_error) < 1e-4
    assert fast_report.relative_error <= exact_report.relative_error * 1.01 + 1e-6
    assert fast.rank == exact.rank == 16


def test_from_dense_of_zero_is_rank_zero() -> None:
    delta, report = LowRankDelta.from_dense(torch.zeros(8, 4), 3)
    assert delta.rank == 0 and report.energy_kept == 1.0


def one_at_a_time(delta: LowRankDelta, rank: int | None, rtol: float = 1e-6) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The reference: one delta's QR + small SVD on its own, as truncate did before batching
    (ΔW_r dense, the rank kept, and the singular values above the floor)."""
    Qb, Rb = torch.linalg.qr(delta.B.double())
    Qa, Ra = torch.linalg.qr(delta.A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    floor = rtol * float(torch.linalg.norm(delta.B.double()) * torch.linalg.norm(delta.A.double()))
    numerical = int((S > floor).sum()) if floor > 0 else 0
    keep = numerical if rank is None else min(numerical, rank)
    return ((Qb @ U[:, :keep]) * S[:keep]) @ (Vh[:keep] @ Qa.T), keep, S[:numerical]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(6, 5), (3, 9), (12, 12)]), st.integers(0, 8), st.one_of(st.none(), st.integers(0, 6))), min_size=1, max_size=8), st.integers(0, 2**16))
def test_truncate_all_equals_one_at_a_time(specs: list, seed: int) -> None:
    """Batched by shape and inner rank (modules of one kind together), every delta gets what its
    own QR + SVD gives (a cancelling pair among them: rank 0), in its own storage, not a view."""
    deltas = [random_delta(seed + i, out, inp, rank) for i, ((out, inp), rank, _) in enumerate(specs)]
    cancel = random_delta(seed, 6, 5, 2)
    deltas.append(LowRankDelta.concat([cancel, cancel.scaled(-1.0)]))
    ranks = [target for _, _, target in specs] + [None]
    for delta, rank, (batched, report) in zip(deltas, ranks, truncate_all(deltas, ranks)):
        dense, keep, singular = one_at_a_time(delta, rank)
        assert batched.rank == keep and report.rank == keep
        torch.testing.assert_close(batched.dense().double(), dense, rtol=1e-5, atol=1e-5)  # float32 factors of float64 ones
        energy = float(singular[:keep].square().sum() / singular.square().sum()) if keep < len(singular) else 1.0
        assert abs(report.energy_kept - energy) < 1e-9
        for factor in (batched.B, batched.A):
            assert factor.untyped_storage().nbytes() == factor.numel() * factor.element_size()


def test_truncate_all_refuses_mismatched_ranks() -> None:
    delta = random_delta(0, 4, 4, 2)
    with pytest.raises(ValueError, match="got 1 ranks for 2 deltas"):
        truncate_all([delta, delta], [1])
    with pytest.raises(ValueError, match="rank must be >= 0, got -1"):
        delta.truncate(-1)
