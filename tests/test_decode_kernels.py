"""The decode step's own kernels: one-query attention over grouped heads equals transformers' SDPA
with repeated key/value heads, and a runtime whose projections and head read oneDNN-packed
weights decodes the tokens and logits the plain model gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adapter_fusion import load_adapter
from adapter_fusion.attention import NAME, decode_attention
from adapter_fusion.runtime import Runtime
from adapter_fusion.decoding import greedy
from adapter_fusion.packed_linear import SharedInput, Sibling

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


class _Heads(torch.nn.Module):
    """What transformers' attention functions read off a Llama attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_one_query_attention_equals_sdpa_over_repeated_heads(dtype: torch.dtype, masked: bool) -> None:
    """Against float32 SDPA on the same (dtype-rounded) inputs. Rounding model: the scores s, the
    probabilities and the mix are each rounded once to the dtype (|Δp|/p <= u|s| + u, so the
    output moves by at most (u·max|s| + 2u)·max|v|), and every float32 sum of length n adds n
    roundings of 2^-24 (scores: dim, mix: length)."""
    batch, heads, kv_heads, length, dim = 5, 9, 3, 37, 64
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(batch, h, n, dim, generator=g).to(dtype).float() for h, n in ((heads, 1), (kv_heads, length), (kv_heads, length)))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :7] = mask[3, ..., :30] = False  # left padding of two rows
    mask = mask if masked else None
    module = _Heads(heads // kv_heads)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)  # (batch, 1, heads, dim)
    got, _ = decode_attention(module, query.to(dtype), key.to(dtype), value.to(dtype), mask, scaling=dim**-0.5)
    assert got.shape == want.shape == (batch, 1, heads, dim) and got.dtype == dtype
    scores = (query @ key.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)).abs().max() * dim**-0.5
    u = UNIT_ROUNDOFF[dtype]
    bound = ((u * (scores + 2) if dtype != torch.float32 else 0) + (dim + length + scores + 2) * UNIT_ROUNDOFF[torch.float32]) * value.abs().max()
    assert (got.float() - want).abs().max() <= bound


def test_prefill_and_longer_queries_are_transformers_sdpa() -> None:
    query, key = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    module = _Heads(2)
    want, _ = sdpa_attention_forward(module, query, key, key, None, scaling=0.5)
    got, _ = decode_attention(module, query, key, key, None, scaling=0.5)
    assert torch.equal(got, want)


def _plain(runtime: Runtime) -> None:
    """Back to transformers' own path: plain weights, SDPA attention."""
    for layer in runtime.layers.values():
        layer.packed = None
    head = runtime.model.get_output_embeddings()
    del head.forward
    runtime.model.set_attn_implementation("sdpa")


def test_packed_runtime_decodes_as_the_plain_model(tiny_chat_base: Path, tiny_adapters: list[Path]) -> None:
    packed, plain = Runtime(tiny_chat_base), Runtime(tiny_chat_base)
    _plain(plain)
    assert packed.model.config._attn_implementation == NAME and plain.model.config._attn_implementation == "sdpa"
    if torch.backends.mkldnn.is_available():
        assert all(layer.packed is not None for layer in packed.layers.values())
        shared = {path.rsplit(".", 1)[-1] for path, layer in packed.layers.items() if isinstance(layer.packed, Sibling)}
        assert shared == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # o_proj and down_proj read inputs of their own
    adapters = [load_adapter(p) for p in tiny_adapters[2:]]  # rank 8 on every target, rank 4 on q and v
    for runtime in (packed, plain):
        runtime.set_slots([[a] for a in adapters])
    prompts = [packed.chat_ids(m) for m in ("Name three rivers.", "Hi", "Count to five, slowly please.")]
    rows = [1, 0, 2]
    assert greedy(packed, prompts, rows, 24) == greedy(plain, prompts, rows, 24)
    with torch.no_grad(), packed.routed(rows):
        ids = torch.tensor([p[:3] for p in prompts])
        packed_logits = packed.model(ids).logits
    with torch.no_grad(), plain.routed(rows):
        plain_logits = plain.model(ids).logits
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing is CPU-only")
def test_shared_input_siblings_each_get_their_own_projection() -> None:
    """Whatever the call order, a repeated call, or an input of its own: each sibling's output is
    its own x Wᵀ + b, and writing into one (as an adapter's delta is added) touches no other."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 8, generator=g) for n in (6, 2, 2)]
    biases = [torch.randn(6, generator=g), None, torch.randn(2, generator=g)]
    shared = SharedInput(weights, biases)
    q, k, v = (shared.member(i) for i in range(3))
    x, other = torch.randn(3, 1, 8, generator=g), torch.randn(3, 1, 8, generator=g)

    def want(i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, weights[i], biases[i])

    got_k = k(x)  # not the first sibling first
    got_k += 100.0  # an adapter's delta, in place
    torch.testing.assert_close(q(x), want(0, x))
    torch.testing.assert_close(k(x), want(1, x))  # called again: computed afresh, not the slice written above
    torch.testing.assert_close(v(other), want(2, other))  # another input: its own
    torch.testing.assert_close(v(x), want(2, x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing is CPU-only")
def test_siblings_that_do_not_share_their_input_are_packed_alone() -> None:
    """Cross-attention's q reads the decoder, k and v the encoder: after a few outputs left untaken,
    each projection computes only its own columns and no shared output is held between calls."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 8, generator=g) for n in (6, 2, 2)]
    shared = SharedInput(weights, [None, None, None])
    q, k, v = (shared.member(i) for i in range(3))
    for _ in range(SharedInput.MISSES):
        decoder, encoder = torch.randn(3, 1, 8, generator=g), torch.randn(3, 5, 8, generator=g)
        torch.testing.assert_close(q(decoder), decoder @ weights[0].T)
        torch.testing.assert_close(k(encoder), encoder @ weights[1].T)
        torch.testing.assert_close(v(encoder), encoder @ weights[2].T)
    out = q(decoder)
    torch.testing.assert_close(out, decoder @ weights[0].T)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()  # its own 6 columns, not a slice of 10
    assert shared._output is None


def test_a_differentiable_forward_reads_the_plain_weights(tiny_chat_base: Path, tiny_adapters: list[Path]) -> None:
    """The packed copy has no backward: a forward that records gradients must not use it."""
    runtime = Runtime(tiny_chat_base)
    runtime.set_slots([[load_adapter(tiny_adapters[2])]])
    path = next(iter(runtime.layers))
    scale = torch.ones(8, requires_grad=True)
    with runtime.scaled({path: scale}):
        nll = runtime.target_nll([[5, 6, 7]], [[8, 9]], [1], differentiable=True)
    nll.sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
