"""Many adapters resident on one model, mixed per batch row: the serving and search kernel.

Every projection of the model (`nn.Linear`, or GPT-2's `Conv1D`, but not the output head) is
wrapped once by `MultiLoraLinear`, so whatever module paths an adapter targets are already there;
a layer no routed slot touches returns its base output at once. A layer holds one buffer of rank
columns shared by all slots, A (C, in) and B (C, out); which columns belong to which slot is the
slot bank's business (`adapter_fusion.slots`), the same in every layer.

A forward is routed by per-row column weights: row b adds Σ_c w[b, c] · (x A[c]ᵀ) B[c]. A plain
adapter row weighs its slot's columns 1; a LoraHub candidate or a merge-free composition weighs
each source's columns by its weight, so one batch serves any number of different exact
Σ wᵢ ΔWᵢ with no merge. Two ways to compute it, chosen per forward:
- grouped: per routed slot, its rows take two matmuls at that slot's own width: the fewest
  FLOPs, so always for a prefill (many tokens per row: compute-bound), and for a decode step
  routed to at most `GROUPED_SLOTS` slots;
- dense: every row takes two matmuls over the whole span of routed columns, masked by its
  weights: three kernel calls per layer whatever the mix, no gathers, for decode steps (one
  token per row: computing every routed column for every row wastes FLOPs, but on the CPU
  fewer, wider calls measured faster than one pair per slot).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from adapter_fusion import packed_linear


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-family siblings called with one input
GROUPED_SLOTS = 1  # a decode step routed to at most this many slots runs slot by slot; measured by bench/serve.py (CPU: dense from 2 slots)


@dataclass(frozen=True)
class Group:
    """One slot's share of a batch: its columns, its rows (None: all) and their column weights."""

    slot: int
    start: int
    end: int
    rows: slice | Tensor | None  # its rows: side by side (a view), or (n,) indices; None: every row
    weights: Tensor | None  # (n, 1, end - start) or None when every weight is 1


@dataclass(frozen=True)
class Routing:
    """How a batch's rows use the column buffers, computed once per forward and shared by every layer."""

    slots: frozenset[int]  # the slots some row uses
    start: int  # the span of columns they occupy
    end: int
    weights: Tensor  # (batch, 1, end - start): each row's weight on each column, 0 outside its slots
    groups: list[Group]  # per slot

    @property
    def dense_decode(self) -> bool:
        """Decode steps (one token per row) go dense over more than `GROUPED_SLOTS` slots."""
        return len(self.groups) > GROUPED_SLOTS


class MultiLoraLinear(nn.Module):
    """A projection plus per-row LoRA deltas: rank column c adds the outer product B[c]ᵀ A[c],
    (out, in) whatever the base's layout (peft's factors for a `Conv1D`, whose weight is stored
    (in, out), are shaped as for a Linear too)."""

    def __init__(self, base: nn.Linear | Conv1D) -> None:
        super().__init__()
        self.base = base
        self.A: Tensor | None = None  # (C, in); None until some slot writes this layer
        self.B: Tensor | None = None  # (C, out)
        self.holds: set[int] = set()  # slots with columns written here
        self.routing: Routing | None = None  # set by `route`
        # (end - start,) over the routed span: this layer's own factor per column, on top of the
        # routing's per-row weights (learned per-module coefficients); None: 1. Set by `scale_columns`
        self.column_scale: Tensor | None = None
        # the base projection on a oneDNN-packed weight (`pack`, `share_inputs`), used without autograd
        self.packed: packed_linear.Packed | packed_linear.Sibling | None = None

    def pack(self) -> None:
        """Keep a oneDNN-packed copy of the base weight for forwards without autograd, if this CPU
        and dtype allow (`adapter_fusion.packed_linear`)."""
        weight = self.base.weight.T if isinstance(self.base, Conv1D) else self.base.weight  # (out, in)
        self.packed = packed_linear.Packed(weight, self.base.bias) if packed_linear.packable(weight) else None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), as a LowRankDelta of this module is shaped."""
        if isinstance(self.base, Conv1D):
            return self.base.nf, self.base.nx
        return self.base.out_features, self.base.in_features

    def forward(self, x: Tensor) -> Tensor:  # x (batch, seq, in)
        # a fresh tensor either way: the deltas are added into it in place
        y = self.base(x) if self.packed is None or torch.is_grad_enabled() else self.packed(x)
        routing = self.routing
        if routing is None or self.holds.isdisjoint(routing.slots):
            return y
        if x.shape[1] == 1 and routing.dense_decode:
            h = (x @ self.A[routing.start : routing.end].T) * routing.weights  # (batch, seq, W); not in place: autograd needs h
            if self.column_scale is not None:
                h = h * self.column_scale
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.B[routing.start : routing.end])  # += (batch·seq, out)
            return y
        for group in routing.groups:
            if group.slot not in self.holds:
                continue
            rows_x = x if group.rows is None else x[group.rows]  # (n, seq, in); a view for a slice
            h = rows_x @ self.A[group.start : group.end].T  # (n, seq, w)
            if group.weights is not None:
                h = h * group.weights
            if self.column_scale is not None:
                h = h * self.column_scale[group.start - routing.start : group.end - routing.start]
            if isinstance(group.rows, Tensor):
                y.index_add_(0, group.rows, h @ self.B[group.start : group.end])  # (n, seq, out) into its rows
            else:
                rows_y = y if group.rows is None else y[group.rows]  # a view of y
                rows_y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.B[group.start : group.end])
        return y


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


def share_inputs(layers: dict[str, MultiLoraLinear]) -> None:
    """Pack each module's siblings that read one input (`SHARED_INPUTS`) as one weight
    (`packed_linear.SharedInput`), where all of them are packed Linears of one input width."""
    for names in SHARED_INPUTS:
        parents: dict[str, dict[str, MultiLoraLinear]] = {}
        for path, layer in layers.items():
            parent, _, leaf = path.rpartition(".")
            if leaf in names:
                parents.setdefault(parent, {})[leaf] = layer
        for siblings in parents.values():
            members = [siblings.get(name) for name in names]
            if any(m is None or not isinstance(m.base, nn.Linear) or not packed_linear.packable(m.base.weight) for m in members):
                continue
            if len({(m.base.in_features, m.base.weight.dtype) for m in members}) > 1:
                continue
            shared = packed_linear.SharedInput([m.base.weight for m in members], [m.base.bias for m in members])
            for i, member in enumerate(members):
                member.packed = shared.member(i)


@contextmanager
def route(layers: dict[str, MultiLoraLinear], routing: Routing | None) -> Iterator[None]:
    """Within the block every forward of these layers follows `routing` (None: the base model)."""
    for layer in layers.values():
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers.values():
            layer.routing = None


@contextmanager
def scale_columns(layers: dict[str, MultiLoraLinear], scales: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, layer `path` multiplies its routed columns by scales[path] ((end - start,)
    over the routing's span; differentiable): one coefficient per source and module, exactly."""
    for path, scale in scales.items():
        layers[path].column_scale = scale
    try:
        yield
    finally:
        for path in scales:
            layers[path].column_scale = None
