"""The slot bank: which rank columns each resident slot owns, and writing them.

vLLM's LoRA model manager is the anchor: buffers allocated once, an adapter made resident by
writing its own slot, never by rebuilding the others. A slot is one adapter, or several sources
side by side (LoraHub's candidates). It owns the same column range [start, start + width) in
every wrapped layer (`lora_layers.MultiLoraLinear`), source i at a fixed offset, as wide as its
widest module and zero where it lacks one, so each slot takes its own width (no padding to the
widest slot) and one routing serves every layer. A layer's buffers are allocated on the first
write that touches it, at the bank's capacity; the capacity starts at `columns` and doubles when
a slot does not fit, the live columns copied over packed (nothing is re-read from adapters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapter_fusion.adapters import Adapter
from adapter_fusion.lora_layers import Group, MultiLoraLinear, Routing

Mix = tuple[tuple[int, tuple[float, ...] | None], ...]  # a row mixing slots: (slot, per-source weights or None = all 1)
Route = int | Mix  # one batch row: a slot (0 = the base model), or a mix of slots


@dataclass(frozen=True)
class Placement:
    start: int
    widths: tuple[int, ...]  # rank columns of each source

    @property
    def end(self) -> int:
        return self.start + sum(self.widths)


def routes_of(rows: Sequence[Route], source_weights: Tensor | None = None) -> list[Mix]:
    """Rows as mixes; `source_weights` (batch, n_sources) weighs each row's slot's sources."""
    if source_weights is None:
        return [((r, None),) if isinstance(r, int) else tuple(r) for r in rows]
    return [((int(r), tuple(w)),) for r, w in zip(rows, source_weights.tolist())]


class SlotBank:
    def __init__(self, layers: dict[str, MultiLoraLinear], device: torch.device, dtype: torch.dtype, columns: int = 64) -> None:
        self.layers = layers
        self.device, self.dtype = device, dtype
        self.initial = max(1, columns)
        self.capacity = self.initial
        self.placements: dict[int, Placement] = {}
        self._last: tuple[tuple, Routing | None] | None = None  # the previous routing, reused while rows and slots stay

    # ---- residency ------------------------------------------------------------------------------

    def write(self, slot: int, sources: Sequence[Adapter]) -> None:
        """Make `slot` hold these sources side by side; only its own columns are written."""
        self.free(slot)
        self._last = None
        widths = tuple(max(a.ranks.values(), default=0) for a in sources)
        start = self._find(sum(widths))
        if start is None:
            self._repack(sum(widths))
            start = self._find(sum(widths))
        placement = Placement(start, widths)
        self.placements[slot] = placement
        for path, layer in self.layers.items():
            deltas = [a.modules.get(path) for a in sources]
            touched = any(d is not None and d.rank > 0 for d in deltas)  # a rank-0 module (all pruned) adds nothing
            if layer.A is None and not touched:
                continue
            out, inp = layer.shape
            A = torch.zeros(placement.end - start, inp)  # (w, in) float32, where the deltas live
            B = torch.zeros(placement.end - start, out)  # (w, out)
            at = 0
            for delta, width in zip(deltas, widths):
                if delta is not None:
                    A[at : at + delta.rank] = delta.A
                    B[at : at + delta.rank] = delta.B.T
                at += width
            self._allocate(layer)
            layer.A[start : placement.end] = A.to(self.device, self.dtype)  # stale columns of a freed slot overwritten too
            layer.B[start : placement.end] = B.to(self.device, self.dtype)
            (layer.holds.add if touched else layer.holds.discard)(slot)

    def free(self, slot: int) -> None:
        """Return the slot's columns; no row may route to it afterwards."""
        if self.placements.pop(slot, None) is not None:
            for layer in self.layers.values():
                layer.holds.discard(slot)
            self._last = None

    def clear(self) -> None:
        for slot in list(self.placements):
            self.free(slot)

    def bytes_for(self, table: Sequence[Sequence[Adapter]]) -> int:
        """The buffers' bytes with these slots resident: the capacity they need (or have) times
        the rank-column bytes of every layer allocated or touched by them."""
        needed = sum(max(a.ranks.values(), default=0) for sources in table for a in sources)
        capacity = max(self.capacity, self._grown(needed))
        touched = {path for sources in table for a in sources for path in a.modules}
        size = torch.empty(0, dtype=self.dtype).element_size()
        return capacity * size * sum(sum(layer.shape) for path, layer in self.layers.items() if layer.A is not None or path in touched)

    # ---- routing --------------------------------------------------------------------------------

    def routing(self, routes: Sequence[Mix]) -> Routing | None:
        """Per-row column weights for a batch (None when every row is the base model)."""
        key = tuple(routes)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        routing = self._routing(routes)
        self._last = (key, routing)
        return routing

    def _routing(self, routes: Sequence[Mix]) -> Routing | None:
        slots = sorted({slot for mix in routes for slot, _ in mix if slot != 0})
        if not slots:
            return None
        start = min(self.placements[s].start for s in slots)
        end = max(self.placements[s].end for s in slots)
        weights = torch.zeros(len(routes), end - start)  # (batch, W)
        for b, mix in enumerate(routes):
            for slot, source_weights in mix:
                if slot == 0:
                    continue
                p = self.placements[slot]
                if source_weights is None:
                    weights[b, p.start - start : p.end - start] += 1.0
                    continue
                at = p.start - start
                for width, w in zip(p.widths, source_weights, strict=True):
                    weights[b, at : at + width] += w
                    at += width
        groups = [self._group(slot, routes, weights, start) for slot in slots]
        dense = weights.to(self.device, self.dtype)[:, None, :]  # (batch, 1, W)
        return Routing(frozenset(slots), start, end, dense, groups)

    def _group(self, slot: int, routes: Sequence[Mix], weights: Tensor, start: int) -> Group:
        p = self.placements[slot]
        rows = [b for b, mix in enumerate(routes) if any(s == slot for s, _ in mix)]
        block = weights[rows, p.start - start : p.end - start]  # (n, w)
        if len(rows) == len(routes):
            index = None
        elif rows == list(range(rows[0], rows[-1] + 1)):
            index = slice(rows[0], rows[-1] + 1)  # side by side: views, no gathers
        else:
            index = torch.tensor(rows, device=self.device)
        scale = None if bool((block == 1).all()) else block.to(self.device, self.dtype)[:, None, :]
        return Group(slot, p.start, p.end, index, scale)

    # ---- columns (first fit; grow by doubling, repacked) -----------------------------------------

    def _find(self, width: int) -> int | None:
        at = 0
        for p in sorted(self.placements.values(), key=lambda p: p.start):
            if p.start - at >= width:
                return at
            at = max(at, p.end)
        return at if self.capacity - at >= width else None

    def _grown(self, needed: int) -> int:
        capacity = self.initial
        while capacity < needed:
            capacity *= 2
        return capacity

    def _repack(self, width: int) -> None:
        """Move every slot left, in order, into buffers of the capacity that fits them plus `width`."""
        used = sum(p.end - p.start for p in self.placements.values())
        capacity = max(self.capacity, self._grown(used + width))
        moves, at = [], 0
        for slot, p in sorted(self.placements.items(), key=lambda item: item[1].start):
            moves.append((p.start, at, p.end - p.start))
            self.placements[slot] = Placement(at, p.widths)
            at += p.end - p.start
        for layer in self.layers.values():
            if layer.A is None:
                continue
            A, B = layer.A, layer.B
            layer.A = A.new_zeros(capacity, A.shape[1])
            layer.B = B.new_zeros(capacity, B.shape[1])
            for old, new, n in moves:
                layer.A[new : new + n], layer.B[new : new + n] = A[old : old + n], B[old : old + n]
        self.capacity = capacity
        self._last = None

    def _allocate(self, layer: MultiLoraLinear) -> None:
        if layer.A is None:
            out, inp = layer.shape
            layer.A = torch.zeros(self.capacity, inp, device=self.device, dtype=self.dtype)  # (C, in)
            layer.B = torch.zeros(self.capacity, out, device=self.device, dtype=self.dtype)  # (C, out)
