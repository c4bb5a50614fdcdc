"""The one target loss every scorer and fit computes: per example, the summed negative
log-likelihood of its target tokens (callers divide by the target tokens for a mean)."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORED = -100  # a label that scores nothing (prompt and padding positions)


def summed_nll(logits: Tensor, labels: Tensor) -> Tensor:  # logits (batch, P, vocab), labels (batch, P) -> (batch,)
    """Each row's summed cross-entropy of its labels at the positions that predict them, `IGNORED`
    positions skipped; float32 whatever the logits' dtype, on their device (differentiable)."""
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORED, reduction="none")
    return nll.view(labels.shape).sum(dim=1)


def causal_nll(logits: Tensor, labels: Tensor) -> Tensor:  # logits (batch, T, vocab), labels (batch, T) -> (batch,)
    """`summed_nll` of a causal model's full-sequence logits: position t predicts token t+1."""
    return summed_nll(logits[:, :-1], labels[:, 1:])
