"""Many adapters resident on one model, chosen per batch row: the serving and search kernel.

Each targeted `nn.Linear` is wrapped once by `MultiLoraLinear`, which holds every resident slot's
factors stacked and zero-padded to a common rank: A (slots, R, in), B (slots, out, R). A forward
gathers each row's factors and adds two batched matmuls to the frozen base output, so a batch can
mix adapters (PEFT's mixed batch instead loops over adapters in every layer). Slot 0 is the
base model (zero factors). A slot may hold several sources' concatenated factors; optional
per-row source weights then scale each source's rank columns, giving every row its own exact
Σ wᵢ ΔWᵢ with no merge (runtime composition, and LoraHub's candidates in one batched pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from adapter_fusion.delta import LowRankDelta


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        out, inp = base.out_features, base.in_features
        self.register_buffer("A", torch.zeros(1, 0, inp), persistent=False)  # (slots, R, in)
        self.register_buffer("B", torch.zeros(1, out, 0), persistent=False)  # (slots, out, R)
        # which source of its slot each rank column came from; padding points one past the last source
        self.register_buffer("column_source", torch.zeros(1, 0, dtype=torch.long), persistent=False)  # (slots, R)
        self.rows: Tensor | None = None  # (batch,) slot per row, set by `route`
        self.source_weights: Tensor | None = None  # (batch, n_sources) or None, set by `route`

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.out_features, self.base.in_features

    def set_slots(self, slots: list[list[LowRankDelta | None]]) -> None:
        """Replace all slots at once. Slot i+1 holds slots[i]: its sources' deltas for this module
        (None where a source lacks it), concatenated; slot 0 stays the base model."""
        out, inp = self.shape
        ranks = [sum(d.rank for d in sources if d is not None) for sources in slots]
        rank = max(ranks, default=0)
        n_sources = max((len(sources) for sources in slots), default=0)
        dtype, device = self.base.weight.dtype, self.base.weight.device
        A = torch.zeros(len(slots) + 1, rank, inp, dtype=dtype, device=device)
        B = torch.zeros(len(slots) + 1, out, rank, dtype=dtype, device=device)
        column_source = torch.full((len(slots) + 1, rank), n_sources, dtype=torch.long, device=device)
        for i, sources in enumerate(slots, start=1):
            at = 0
            for s, d in enumerate(sources):
                if d is None:
                    continue
                A[i, at : at + d.rank] = d.A.to(dtype)
                B[i, :, at : at + d.rank] = d.B.to(dtype)
                column_source[i, at : at + d.rank] = s
                at += d.rank
        self.A, self.B, self.column_source = A, B, column_source

    def forward(self, x: Tensor) -> Tensor:  # x (batch, seq, in)
        y = self.base(x)
        if self.rows is None or self.A.shape[1] == 0:
            return y
        A = self.A[self.rows]  # (batch, R, in)
        B = self.B[self.rows]  # (batch, out, R)
        h = torch.bmm(x, A.transpose(1, 2))  # (batch, seq, R)
        if self.source_weights is not None:
            weights = nn.functional.pad(self.source_weights, (0, 1))  # (batch, n_sources + 1): padding weighs 0
            index = self.column_source[self.rows].clamp(max=weights.shape[1] - 1)  # (batch, R)
            h = h * weights.gather(1, index)[:, None, :].to(h.dtype)
        return y + torch.bmm(h, B.transpose(1, 2))  # (batch, seq, out)


def inject(model: nn.Module, targets: list[str]) -> dict[str, MultiLoraLinear]:
    """Wrap every nn.Linear whose leaf name is in `targets`; returns {module path: layer}."""
    layers = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            parent_path, _, leaf = path.rpartition(".")
            wrapped = MultiLoraLinear(module)
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapped)
            layers[path] = wrapped
    return layers


@contextmanager
def route(layers: dict[str, MultiLoraLinear], rows: Tensor | None, source_weights: Tensor | None = None) -> Iterator[None]:
    """Within the block, row b of every forward uses slot rows[b], each source of that slot
    weighted by source_weights[b] if given (else weight 1)."""
    for layer in layers.values():
        layer.rows, layer.source_weights = rows, source_weights
    try:
        yield
    finally:
        for layer in layers.values():
            layer.rows, layer.source_weights = None, None
