"""One module's low-rank update ΔW = B @ A and the exact algebra on it.

The whole speed of this library rests on `truncate`: a sum of n adapters is itself a low-rank
product with R = Σ r_i columns, so its best rank-r approximation comes from an R×R core (QR of
both factors, then the SVD of the product of their triangular parts), never from the dense out×in
matrix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Truncation:
    """What re-factoring kept of one module's update (Frobenius norms)."""

    rank: int
    energy_kept: float  # Σ kept σ² / Σ σ², 1.0 when nothing was cut
    relative_error: float  # ‖ΔW − ΔW_r‖ / ‖ΔW‖, 0.0 when nothing was cut


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = B @ A with the LoRA scale already folded in (float32 by convention)."""

    B: Tensor  # (out, r)
    A: Tensor  # (r, in)

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"B {tuple(self.B.shape)} and A {tuple(self.A.shape)} do not form B @ A")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> Tensor:
        return self.B @ self.A  # (out, in)

    def scaled(self, weight: float) -> LowRankDelta:
        return LowRankDelta(self.B * weight, self.A)

    def frobenius_norm(self) -> float:
        """‖B A‖_F from the r×r Gram matrices, without forming B @ A."""
        return inner(self, self) ** 0.5

    @staticmethod
    def zeros(shape: tuple[int, int], rank: int = 0) -> LowRankDelta:
        return LowRankDelta(torch.zeros(shape[0], rank), torch.zeros(rank, shape[1]))

    @staticmethod
    def concat(deltas: list[LowRankDelta]) -> LowRankDelta:
        """The exact sum Σ B_i A_i as one product of rank Σ r_i."""
        if not deltas:
            raise ValueError("concat needs at least one delta")
        shapes = {d.shape for d in deltas}
        if len(shapes) != 1:
            raise ValueError(f"cannot add deltas of different shapes {sorted(shapes)}")
        return LowRankDelta(torch.cat([d.B for d in deltas], dim=1), torch.cat([d.A for d in deltas], dim=0))

    def truncate(self, rank: int | None = None, rtol: float = 1e-6) -> tuple[LowRankDelta, Truncation]:
        """Best rank-`rank` approximation (Eckart–Young), exact, in O((out+in)·R² + R³).

        QR both factors (B = Qb Rb, Aᵀ = Qa Ra), SVD the small core Rb Raᵀ = U S Vᵀ, then
        ΔW = (Qb U) S (Qa V)ᵀ. `rank=None` keeps every singular value above `rtol`·σ_max (the
        exact numerical rank; the scale is ‖B‖‖A‖, so cancelling sources such as w and −w give
        rank 0). The factors are balanced: B = Qb U √S, A = √S Vᵀ Qaᵀ. `truncate_all` does many.
        """
        return truncate_all([self], [rank], rtol)[0]

    @staticmethod
    def from_dense(
        W: Tensor, rank: int, exact: bool = False, oversample: int = 16, power_iterations: int = 4, seed: int = 0
    ) -> tuple[LowRankDelta, Truncation]:
        """Rank-`rank` factors of a dense (out, in) update.

        By default a randomized range finder (Halko et al.: `oversample` extra directions,
        `power_iterations` subspace iterations), which costs O(out·in·(rank+oversample)) instead
        of a full SVD. The reported error is exact for what is returned: the result is the
        orthogonal projection of W onto the found range, so ‖W − W_r‖² = ‖W‖² − Σ kept σ².
        """
        if W.ndim != 2:
            raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
        W32 = W.float()
        total = float(W32.square().sum())
        if total == 0.0 or rank == 0:
            return LowRankDelta.zeros(tuple(W.shape)), Truncation(0, 1.0 if total == 0 else 0.0, 0.0 if total == 0 else 1.0)
        q = min(rank + oversample, *W.shape)
        if exact or q >= min(W.shape):
            U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        else:
            U, S, Vh = _randomized_svd(W32, q, power_iterations, seed)
        keep = min(rank, int((S > 0).sum()))
        root = S[:keep].sqrt()
        delta = LowRankDelta(U[:, :keep] * root, root[:, None] * Vh[:keep])
        kept = float(S[:keep].double().square().sum())
        energy = min(kept / total, 1.0)
        return delta, Truncation(keep, energy, max(1.0 - energy, 0.0) ** 0.5)


def truncate_all(deltas: Sequence[LowRankDelta], ranks: Sequence[int | None], rtol: float = 1e-6) -> list[tuple[LowRankDelta, Truncation]]:
    """`LowRankDelta.truncate` of each delta to its rank. Deltas of one shape and inner rank (a
    merge's modules of one kind) share one batched QR, SVD and product: a few LAPACK calls per
    kind instead of a dozen small calls per module, each of which wakes the thread pool (on a
    server whose pool sleeps between requests that wake-up, not the arithmetic, is most of a merge)."""
    if len(ranks) != len(deltas):
        raise ValueError(f"got {len(ranks)} ranks for {len(deltas)} deltas")
    for rank in ranks:
        if rank is not None and rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
    kinds: dict[tuple, list[int]] = defaultdict(list)
    for i, d in enumerate(deltas):
        kinds[(tuple(d.B.shape), tuple(d.A.shape), d.B.dtype, d.A.dtype, d.B.device)].append(i)
    out: list[tuple[LowRankDelta, Truncation]] = [None] * len(deltas)  # type: ignore[list-item]
    for (_, _, b_dtype, a_dtype, _), members in kinds.items():
        B = torch.stack([deltas[i].B for i in members]).double()  # (n, out, R)
        A = torch.stack([deltas[i].A for i in members]).double()  # (n, R, in)
        Qb, Rb = torch.linalg.qr(B)  # (n, out, k), (n, k, R)
        Qa, Ra = torch.linalg.qr(A.transpose(1, 2))  # (n, in, k'), (n, k', R)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))  # cores (n, k, k')
        root = S.sqrt()  # (n, m)
        m = S.shape[1]
        B_all = ((Qb @ U[..., :m]) * root[:, None, :]).to(b_dtype)  # (n, out, m)
        A_all = (root[..., None] * (Vh[:, :m] @ Qa.transpose(1, 2))).to(a_dtype)  # (n, m, in)
        floors = (rtol * torch.linalg.vector_norm(B, dim=(1, 2)) * torch.linalg.vector_norm(A, dim=(1, 2))).tolist()
        del B, A, Qb, Qa  # the batch's float64 working set goes before its outputs are cut apart
        for j, i in enumerate(members):
            numerical = int((S[j] > floors[j]).sum()) if floors[j] > 0 else 0
            keep = numerical if ranks[i] is None else min(numerical, ranks[i])
            truncated = LowRankDelta(B_all[j, :, :keep].clone(), A_all[j, :keep].clone())  # its own storage, not a view of the batch
            out[i] = truncated, _truncation_report(S[j, :numerical], keep)  # below the floor is rounding noise
    return out


def inner(x: LowRankDelta, y: LowRankDelta) -> float:
    """Frobenius inner product ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ), in O((out+in)·r₁r₂)."""
    return float(((x.B.T.double() @ y.B.double()) * (x.A.double() @ y.A.T.double())).sum())


def _randomized_svd(W: Tensor, q: int, power_iterations: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of Q Qᵀ W where Q spans an approximate top-q range of W (seeded, re-orthonormalised)."""
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(W.shape[1], q, generator=generator)  # (in, q)
    Q, _ = torch.linalg.qr(W @ omega)  # (out, q)
    for _ in range(power_iterations):
        Z, _ = torch.linalg.qr(W.T @ Q)  # (in, q)
        Q, _ = torch.linalg.qr(W @ Z)  # (out, q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (q, q), (q,), (q, in)
    return Q @ Ub, S, Vh


def _truncation_report(S: Tensor, keep: int) -> Truncation:
    energy = S.square()
    total = float(energy.sum())
    if total == 0.0:
        return Truncation(keep, 1.0, 0.0)
    tail = float(energy[keep:].sum())
    return Truncation(keep, 1.0 - tail / total, (tail / total) ** 0.5)
