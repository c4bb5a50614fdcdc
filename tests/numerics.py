"""Error bounds derived from float32 arithmetic, shared by the tests that compare two
evaluations of the same maths (ours against PEFT's)."""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, twice the unit roundoff u of float32


def merge_rounding(W: torch.Tensor, M: torch.Tensor, r: int) -> torch.Tensor:
    """How far two fp32 evaluations of W + s·B@A may differ, element by element, where M = s·|B|@|A|.

    PEFT's merge_and_unload rounds B@A (r products summed: within γ_r·M, γ_r ≈ r·u), then ·s
    (u·M), then W + ΔW (u·|W + ΔW|). We fold √s into each factor at load (√s to fp32 and the
    product: 2u per factor, 4u·M for their product) before the same product and sum. With
    u = eps32/2 and |ΔW| <= M the two differ by at most u·(2|W| + (2r + 7)·M), which
    eps32·(|W| + (r + 4)·M) bounds, to first order in u.
    """
    return EPS32 * (W.abs() + (r + 4) * M)


def logits_bound(config, rho: float) -> float:
    """Relative (Frobenius) bound on the logits of two fp32 forward passes whose weights agree to
    `rho` (the relative size of their elementwise difference bound, see `merge_rounding`).

    In a length-d dot product, an elementwise weight perturbation ρ·|W| moves the output by up to
    ρ·|W|@|x|, which is about √d times |W@x| when signs are not aligned: a relative √d·ρ. Once the
    weights differ, the two passes also round differently; each length-d dot product rounds to
    about √d·u relative (errors of random sign add like a random walk; Higham & Mary, SIAM J. Sci.
    Comput. 2019), two passes √d·eps32. Every block adds its error to the residual stream, which a
    pre-norm block passes on without amplifying (RMSNorm rescales), so over L blocks the errors add:
    L·√d·(ρ + eps32), with d the longest dot product (the MLP's inner size).
    """
    d = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    return config.num_hidden_layers * d**0.5 * (rho + EPS32)


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))
