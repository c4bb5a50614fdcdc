"""The running batch's KV cache, grown in place.

transformers' DynamicLayer concatenates the whole cache with each step's new positions, so a
step copies every layer's keys and values (and rebuilding a DynamicCache from tensors copies them
once more): O(L) per token, O(L²) per sequence. Here each layer's keys and values are views into
buffers with spare room along the sequence; a step writes its positions in place, and a full
buffer doubles (amortised O(1) per token). Rows join (`joined`) and leave (`select`) only at
step boundaries, where new buffers are built once. Full attention on every layer, as
DynamicCache without a config gives.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_CAPACITY = 64  # positions: a short prompt's first steps need no regrowth


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, (batch, heads, L, dim) views into (batch, heads, capacity, dim) buffers."""

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None) -> None:
        super().__init__()
        if keys is not None:
            self.lazy_initialization(keys, values)
            self._adopt(keys, values, double=False)

    def _adopt(self, keys: Tensor, values: Tensor, coming: int = 0, double: bool = True) -> None:
        """Copy `keys`/`values` into fresh buffers with room for `coming` more positions, then as
        many again as that (`double`: regrowth) or MIN_CAPACITY more (rows joining or leaving:
        the copy is made anyway, doubling the room need not be)."""
        held = keys.shape[-2]
        need = held + coming
        capacity = max(2 * need if double else need + MIN_CAPACITY, MIN_CAPACITY)
        self._keys = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._keys[..., :held, :] = keys
        self._values[..., :held, :] = values
        self.keys, self.values = self._keys[..., :held, :], self._values[..., :held, :]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._adopt(key_states, value_states)
            return self.keys, self.values
        length, new = self.keys.shape[-2], key_states.shape[-2]
        # an inherited method (beam reorder, batch select, repeat) replaced the keys with a new tensor
        replaced = self.keys.data_ptr() != self._keys.data_ptr() or self.keys.shape[0] != self._keys.shape[0]
        if replaced or length + new > self._keys.shape[-2]:
            self._adopt(self.keys, self.values, new)
        self._keys[..., length : length + new, :] = key_states
        self._values[..., length : length + new, :] = value_states
        self.keys, self.values = self._keys[..., : length + new, :], self._values[..., : length + new, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache (what the model code expects) whose layers grow in place."""

    def __init__(self, layers: list[GrowingLayer] | None = None) -> None:
        super(DynamicCache, self).__init__(**({"layers": layers} if layers else {"layer_class_to_replicate": GrowingLayer}))

    def select(self, rows: Tensor) -> GrowingCache:
        """Only these batch rows (a 1-d index), in that order."""
        return GrowingCache([GrowingLayer(layer.keys[rows], layer.values[rows]) for layer in self.layers])

    def joined(self, other: GrowingCache, length: int) -> GrowingCache:
        """This cache's rows, then `other`'s, each left-padded with zeros to `length` positions."""
        return GrowingCache(
            [
                GrowingLayer(torch.cat([left_pad(a.keys, length, 2), left_pad(b.keys, length, 2)]), torch.cat([left_pad(a.values, length, 2), left_pad(b.values, length, 2)]))
                for a, b in zip(self.layers, other.layers)
            ]
        )


def left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    """`t` with zeros before it along `dim`, to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
