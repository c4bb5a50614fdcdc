"""Base projection weights reordered once into oneDNN's blocked layout, for inference on the CPU.

A decode step multiplies a few rows by every weight of the model once: its time is the time to
stream the weights from memory. `F.linear` reads a plain (out, in) weight through MKL; oneDNN's
prepacked layout (what inductor's CPU freezing and vLLM's CPU backend use) reads the same bytes
in the order its kernel consumes them, and uses AVX512-BF16/AMX instructions for bfloat16.
Measured here (2 cores, SmolLM2's 1536x576 projection, 30 distinct weights, 16 rows): float32
1.6x and bfloat16 1.65x faster than `F.linear`, a 512-row prefill 1.1x faster.

Sibling projections that read the same input (a layer's q/k/v, its gate/up) are packed as one
weight (`SharedInput`): one wider matmul instead of three or two, as vLLM's QKV and gate-up layers
do; each projection's output is its column slice of the shared result.

The packed copy is used only where no gradient is recorded (decoding, scoring without autograd):
it has no backward, so a differentiable forward (learned coefficients) reads the plain weight. It
is a copy: the plain weight stays for autograd, tied embeddings and anything reading `.weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BATCH_HINT = 16  # the row count oneDNN chooses its blocking for; any count runs, 1 to 512 measured alike

_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packable(weight: Tensor) -> bool:
    """Whether oneDNN can prepack this (out, in) weight here: a CPU tensor of float32 or bfloat16."""
    return weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES and torch.backends.mkldnn.is_available()


def pack(weight: Tensor) -> Tensor:
    """`weight` (out, in) as an opaque oneDNN tensor for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:  # x (..., in) -> (..., out)
    """x Wᵀ + b with a weight from `pack`: a fresh, plain tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Packed:
    """One projection's forward on its packed weight: x (..., in) -> a fresh (..., out)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:  # weight (out, in)
        self.weight, self.bias = pack(weight), bias

    def __call__(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class SharedInput:
    """Projections that read the same input as one packed (Σ out, in) weight. The first of them
    called with an input computes every one's output; each takes its column slice (a view, its
    own columns: adding its adapter into it in place touches no sibling's), and the shared result
    is let go once all have taken theirs. A projection called again, or with another input,
    computes afresh, so any call order gives each its own x Wᵀ + b. Siblings that turn out not to
    share their input (cross-attention: q reads the decoder, k and v the encoder; layers that reuse
    another's keys) leave outputs untaken: after `MISSES` of those each is packed alone."""

    MISSES = 3  # a fault between siblings leaves one too: a few are forgiven

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None]) -> None:  # weights (out_i, in)
        self.weights, self.biases = weights, biases  # the plain ones: packed alone if these siblings do not share
        self.weight: Tensor | None = pack(torch.cat(weights))
        self.alone: list[Packed] | None = None
        self.misses = 0
        self.bias = None if all(b is None for b in biases) else torch.cat([w.new_zeros(len(w)) if b is None else b for w, b in zip(weights, biases)])
        ends = torch.tensor([len(w) for w in weights]).cumsum(0).tolist()
        self.columns = list(zip([0, *ends[:-1]], ends))
        self._input: Tensor | None = None
        self._output: Tensor | None = None  # (..., Σ out)
        self._waiting: set[int] = set()  # members yet to take their slice of `_output`

    def member(self, i: int) -> Sibling:
        return Sibling(self, i)

    def output(self, i: int, x: Tensor) -> Tensor:  # x (..., in) -> (..., out_i), a view
        if self.alone is None and (x is not self._input or i not in self._waiting):
            self.misses += bool(self._waiting)  # the last shared output was not taken by every sibling
            if self.misses >= self.MISSES:
                self.alone = [Packed(w, b) for w, b in zip(self.weights, self.biases)]
                self.weight = self._input = self._output = None
            else:
                self._input, self._output, self._waiting = x, linear(x, self.weight, self.bias), set(range(len(self.columns)))
        if self.alone is not None:
            return self.alone[i](x)
        start, end = self.columns[i]
        y = self._output[..., start:end]
        self._waiting.discard(i)
        if not self._waiting:
            self._input = self._output = None
        return y


class Sibling:
    """Member i of a `SharedInput`, called as a `Packed` is."""

    def __init__(self, shared: SharedInput, i: int) -> None:
        self.shared, self.i = shared, i

    def __call__(self, x: Tensor) -> Tensor:
        return self.shared.output(self.i, x)


class PackedHead:
    """The output head's forward with a packed copy of its weight, used where no gradient is
    recorded. The head stays the same module (its weight tied to the embeddings, its hooks and
    `get_output_embeddings` unchanged): only its forward is this object's."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.packed = pack(head.weight)

    def __call__(self, x: Tensor) -> Tensor:  # x (..., d) -> (..., vocab)
        if torch.is_grad_enabled() or x.dtype != self.head.weight.dtype:
            return nn.functional.linear(x, self.head.weight, self.head.bias)
        return linear(x, self.packed, self.head.bias)


def pack_head(model: nn.Module) -> None:
    """Give the model's output head a packed forward, where it is a plain CPU Linear oneDNN takes."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear and packable(head.weight):
        head.forward = PackedHead(head)  # an instance attribute: nn.Module.__call__ (and its hooks) stay
