"""Many adapters resident on one model, chosen per batch row: the serving and search kernel.

Every projection of the model (`nn.Linear`, or GPT-2's `Conv1D`, but not the output head) is
wrapped once by `MultiLoraLinear`, so whatever module paths an adapter targets are already there;
a layer no resident slot touches returns its base output at once. Each layer holds every slot's
factors stacked and zero-padded to a common rank: A (slots, R, in), B (slots, out, R). When a
batch uses few distinct slots (evaluation, LoraHub, a busy adapter), each slot's rows take two
plain matmuls at that slot's own rank; when it mixes many, a forward gathers each row's factors
and adds two batched matmuls, so either way one batch mixes adapters (PEFT's mixed batch instead
loops over every adapter in every layer). Slot 0 is the base model (zero factors). A slot may hold
several sources' concatenated factors; optional per-row source weights then scale each source's
rank columns, giving every row its own exact Σ wᵢ ΔWᵢ with no merge (runtime composition, and
LoraHub's candidates in one batched pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from adapter_fusion.delta import LowRankDelta


GROUPED_SLOTS = 4  # a batch with at most this many distinct adapter slots runs slot by slot


@dataclass(frozen=True)
class Routing:
    """Which slot each batch row uses, computed once per forward and shared by every layer."""

    rows: Tensor  # (batch,) slot per row
    source_weights: Tensor | None  # (batch, n_sources) or None
    groups: list[tuple[int, Tensor | None]] | None  # (slot, its rows or None = all) per non-base slot; None: gather

    @classmethod
    def of(cls, rows: Tensor, source_weights: Tensor | None = None) -> Routing:
        present = rows.unique().tolist()
        if len(present) > GROUPED_SLOTS:
            return cls(rows, source_weights, None)
        groups = [(s, None if len(present) == 1 else (rows == s).nonzero()[:, 0]) for s in present if s != 0]
        return cls(rows, source_weights, groups)


class MultiLoraLinear(nn.Module):
    """A projection plus per-row LoRA deltas ΔW = B @ A, (out, in) whatever the base's layout:
    peft's factors for a `Conv1D` (weight stored (in, out)) are shaped as for a Linear too."""

    def __init__(self, base: nn.Linear | Conv1D) -> None:
        super().__init__()
        self.base = base
        out, inp = self.shape
        self.rank = 0  # widest slot's rank R; 0: no slot touches this layer, forward is base(x)
        self.register_buffer("A", torch.zeros(1, 0, inp), persistent=False)  # (slots, R, in)
        self.register_buffer("B", torch.zeros(1, out, 0), persistent=False)  # (slots, out, R)
        # which source of its slot each rank column came from; padding points one past the last source
        self.register_buffer("column_source", torch.zeros(1, 0, dtype=torch.long), persistent=False)  # (slots, R)
        # per slot, views at its own rank (the rest of its R columns are zero): A.T (in, r), B.T (r, out), column sources (r,)
        self.slot_factors: list[tuple[Tensor, Tensor, Tensor]] = []
        self.routing: Routing | None = None  # set by `route`

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), as a LowRankDelta of this module is shaped."""
        if isinstance(self.base, Conv1D):
            return self.base.nf, self.base.nx
        return self.base.out_features, self.base.in_features

    def set_slots(self, slots: list[list[LowRankDelta | None]]) -> None:
        """Replace all slots at once. Slot i+1 holds slots[i]: its sources' deltas for this module
        (None where a source lacks it), concatenated; slot 0 stays the base model. Stacked in
        float32 on the CPU where the deltas live, then moved to the base's device and dtype once."""
        out, inp = self.shape
        ranks = [sum(d.rank for d in sources if d is not None) for sources in slots]
        rank = max(ranks, default=0)
        n_sources = max((len(sources) for sources in slots), default=0)
        A = torch.zeros(len(slots) + 1, rank, inp)
        B = torch.zeros(len(slots) + 1, out, rank)
        column_source = torch.full((len(slots) + 1, rank), n_sources, dtype=torch.long)
        for i, sources in enumerate(slots, start=1):
            at = 0
            for s, d in enumerate(sources):
                if d is None:
                    continue
                A[i, at : at + d.rank] = d.A
                B[i, :, at : at + d.rank] = d.B
                column_source[i, at : at + d.rank] = s
                at += d.rank
        weight = self.base.weight
        self.A, self.B = A.to(weight.device, weight.dtype), B.to(weight.device, weight.dtype)
        self.column_source = column_source.to(weight.device)
        self.rank = rank
        self.slot_factors = [(self.A[i, :r].T, self.B[i, :, :r].T, self.column_source[i, :r]) for i, r in enumerate([0, *ranks])]

    def forward(self, x: Tensor) -> Tensor:  # x (batch, seq, in)
        routing = self.routing
        if routing is None or not self.rank:
            return self.base(x)
        y = self.base(x)
        if routing.groups is None:
            return y + self._gathered(x, routing)
        for slot, picked in routing.groups:
            A_t, B_t, columns = self.slot_factors[slot]
            rows_x = x if picked is None else x[picked]  # (n, seq, in)
            h = rows_x @ A_t  # (n, seq, r)
            if routing.source_weights is not None:
                weights = routing.source_weights if picked is None else routing.source_weights[picked]  # (n, n_sources)
                h = h * weights[:, columns].unsqueeze(1).to(h.dtype)
            delta = h @ B_t  # (n, seq, out)
            y = y + delta if picked is None else y.index_add(0, picked, delta)
        return y

    def _gathered(self, x: Tensor, routing: Routing) -> Tensor:  # x (batch, seq, in) -> (batch, seq, out)
        A = self.A[routing.rows]  # (batch, R, in)
        B = self.B[routing.rows]  # (batch, out, R)
        h = torch.bmm(x, A.transpose(1, 2))  # (batch, seq, R)
        if routing.source_weights is not None:
            weights = nn.functional.pad(routing.source_weights, (0, 1))  # (batch, n_sources + 1): padding weighs 0
            index = self.column_source[routing.rows].clamp(max=weights.shape[1] - 1)  # (batch, R)
            h = h * weights.gather(1, index)[:, None, :].to(h.dtype)
        return torch.bmm(h, B.transpose(1, 2))


def inject(model: nn.Module, targets: list[str] | None = None) -> dict[str, MultiLoraLinear]:
    """Wrap every projection (nn.Linear or Conv1D) but the output head, or with `targets` only
    those whose leaf name is listed; returns {module path: layer}. The head is left alone: LoRA
    on it is rare, and it is often the input embedding's tied twin."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {}
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | Conv1D) or module is head:
            continue
        if targets is not None and path.rsplit(".", 1)[-1] not in targets:
            continue
        parent_path, _, leaf = path.rpartition(".")
        wrapped = MultiLoraLinear(module)
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapped)
        layers[path] = wrapped
    return layers


@contextmanager
def route(layers: dict[str, MultiLoraLinear], rows: Tensor | None, source_weights: Tensor | None = None) -> Iterator[None]:
    """Within the block, row b of every forward uses slot rows[b], each source of that slot
    weighted by source_weights[b] if given (else weight 1)."""
    routing = None if rows is None else Routing.of(rows, source_weights)
    for layer in layers.values():
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers.values():
            layer.routing = None
